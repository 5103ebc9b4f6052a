"""The daemon's event loop: uvloop when it is installed, asyncio's own loop otherwise.

uvloop is a runtime dependency because it was measured to pay (bench/RESULTS.md, "Bulk
and sftp"): asyncio's selector transport costs more per `send()`, and a bulk download is
one send per SSH packet, so uvloop cuts the daemon's CPU per GiB. Nothing in meshsshd
spawns through the loop: session children are started with `subprocess.Popen` in an
executor (uvloop has no `create_subprocess_exec(user=…)`) and their exits are watched
through pidfds with `add_reader`; the dataplane's tools run through `subprocess` in the
executor too, because uvloop's `create_subprocess_exec` leaks copies of the child's pipes
into it (dataplane/_exec.py). If the import fails (a platform without wheels, a broken install) the daemon still runs,
on asyncio's loop, and says so once in its log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .logs import event

log = logging.getLogger(__name__)

T = TypeVar("T")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError as exc:
        event(log, "event-loop.fallback", logging.WARNING, loop="asyncio", reason=str(exc))
        return None
    event(log, "event-loop.selected", loop="uvloop", version=uvloop.__version__)
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop chosen above."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)
