"""Running the data plane's tools (`ip`, `wg`, `nft`, `wireguard-go`) without blocking.

Every call goes through `run()`, which uses `asyncio.create_subprocess_exec` (no shell,
arguments as a list) and turns a failure into a `DataplaneError` that names the command
and carries its stderr.
"""

from __future__ import annotations

import asyncio
import logging
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
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise DataplaneError(f"{argv[0]} is not installed") from exc
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout
        )
    except asyncio.TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise DataplaneError(f"{' '.join(argv[:3])} did not finish within {timeout:.0f}s") from exc
    result = Result(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and result.returncode != 0:
        event(log, "dataplane.command_failed", logging.WARNING, argv=argv[:4], rc=result.returncode,
              stderr=result.stderr.strip()[:500])
        raise DataplaneError(
            f"{' '.join(argv[:4])} failed (exit {result.returncode}): {result.stderr.strip()[:300]}"
        )
    return result
