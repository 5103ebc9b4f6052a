"""Running the data plane's tools (`ip`, `wg`, `nft`, `wireguard-go`) without blocking.

Every call goes through `run()`, which runs `subprocess.run` (no shell, arguments as a
list) in the loop's executor and turns a failure into a `DataplaneError` that names the
command and carries its stderr.

Why not `asyncio.create_subprocess_exec`: under uvloop (the daemon's loop, see
meshsshd/event_loop.py) the child inherits extra copies of its stdout/stderr pipes, so a
tool that daemonises (`wireguard-go`) passes them on to its daemon and the pipes never
reach EOF; `run()` then waited out its timeout and the first network map was never
applied. `subprocess` closes every other fd in the child (close_fds), whatever the loop.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from dataclasses import dataclass

from ..errors import DataplaneError
from ..logs import event

log = logging.getLogger("meshsshd.dataplane")


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


async def run(argv: list[str], stdin: str | None = None, check: bool = True, timeout: float = 20.0) -> Result:
    def call() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            argv,
            input=stdin.encode() if stdin is not None else None,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )

    try:
        proc = await asyncio.get_running_loop().run_in_executor(None, call)
    except FileNotFoundError as exc:
        raise DataplaneError(f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise DataplaneError(f"{' '.join(argv[:3])} did not finish within {timeout:.0f}s") from exc
    result = Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
    if check and result.returncode != 0:
        event(log, "dataplane.command_failed", logging.WARNING, argv=argv[:4], rc=result.returncode,
              stderr=result.stderr.strip()[:500])
        raise DataplaneError(
            f"{' '.join(argv[:4])} failed (exit {result.returncode}): {result.stderr.strip()[:300]}"
        )
    return result
