"""The daemon's event loop: uvloop when it is installed, asyncio's own loop otherwise.

uvloop is a runtime dependency because it was measured to pay (bench/RESULTS.md, "Bulk
and sftp"): asyncio's selector transport costs more per `send()`, and a bulk download is
one send per SSH packet, so uvloop cuts the daemon's CPU per GiB. Nothing in meshsshd
needs what uvloop lacks: session children are started with `subprocess.Popen` in an
executor (not `create_subprocess_exec(user=…)`), their exits are watched through pidfds
with `add_reader`, and the dataplane's `create_subprocess_exec` calls pass no `user=`.
If the import fails (a platform without wheels, a broken install) the daemon still runs,
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
