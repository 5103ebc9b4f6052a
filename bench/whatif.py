"""What-if runs: `meshsshd serve` with one change applied from outside, to measure an
idea before anyone changes the server. Not product code; bench only.

    python -m bench --whatif --mesh-env MESHBENCH_KEEP_IGNORE=1 --only bulk

Each switch is an environment variable read here (the harness passes them with
--mesh-env), and the patched server is then started exactly like `meshsshd serve`:

- MESHBENCH_ASYNCIO_LOOP=1    run the daemon on asyncio's loop instead of uvloop
                              (meshsshd.event_loop picks uvloop when it imports)
- MESHBENCH_WINDOW=BYTES      SSH channel receive window (asyncssh default 2 MiB)
- MESHBENCH_PKTSIZE=BYTES     max packet size offered (asyncssh default 32 KiB)
- MESHBENCH_PIPE_SZ=BYTES     F_SETPIPE_SZ on every os.pipe() (Linux default 64 KiB)
- MESHBENCH_READ_SIZE=BYTES   read size of the child-output pump (meshsshd.session._io)
- MESHBENCH_COALESCE=1        combine all socket writes of one loop iteration into one
                              send() (asyncio tries send() per SSH packet otherwise)
- MESHBENCH_HIGH_WATER=BYTES  pause threshold of the child-input pump (session._io.HIGH_WATER)
- MESHBENCH_KEEP_IGNORE=1     let asyncssh send the empty SSH_MSG_IGNORE it puts before every
                              encrypted packet (meshsshd.asyncssh_tuning drops it for non-CBC
                              ciphers; it doubles the packets, encryptions and send()s)
- MESHBENCH_TRACEMALLOC=1     trace allocations; SIGUSR1 logs the 15 biggest allocation
                              sites to stderr (the daemon's log)
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Any

F_SETPIPE_SZ = 1031


def _patch_listen(window: int | None, pktsize: int | None) -> None:
    import asyncssh

    original = asyncssh.listen

    def listen(*args: Any, **kwargs: Any) -> Any:
        if window:
            kwargs.setdefault("window", window)
        if pktsize:
            kwargs.setdefault("max_pktsize", pktsize)
        return original(*args, **kwargs)

    asyncssh.listen = listen


def _patch_pipe(size: int) -> None:
    original = os.pipe

    def pipe() -> tuple[int, int]:
        r, w = original()
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, size)
        except OSError:
            pass
        return r, w

    os.pipe = pipe


def _patch_coalesce() -> None:
    """asyncssh writes every packet to the transport on its own, and asyncio's selector
    transport calls send() at once when its buffer is empty: one syscall per 32 KiB
    packet. Collect the writes of one loop iteration and send them together."""
    from asyncio import selector_events as se

    cls = se._SelectorSocketTransport
    orig_write, orig_close, orig_eof = cls.write, cls.close, cls.write_eof

    def flush(self: Any) -> None:
        pending = self.__dict__.get("_mb_pending")
        if pending:
            data = bytes(pending)
            pending.clear()
            orig_write(self, data)

    def write(self: Any, data: Any) -> None:
        pending = self.__dict__.setdefault("_mb_pending", bytearray())
        if not pending:
            self._loop.call_soon(flush, self)
        pending += data

    def get_write_buffer_size(self: Any) -> int:
        return len(self._buffer) + len(self.__dict__.get("_mb_pending", b""))

    def close(self: Any) -> None:
        flush(self)
        orig_close(self)

    def write_eof(self: Any) -> None:
        flush(self)
        orig_eof(self)

    cls.write, cls.close, cls.write_eof = write, close, write_eof
    cls.get_write_buffer_size = get_write_buffer_size


def _trace_on_usr1() -> None:
    import signal
    import tracemalloc

    tracemalloc.start(8)

    def dump(signum: int, frame: Any) -> None:
        snap = tracemalloc.take_snapshot()
        current, peak = tracemalloc.get_traced_memory()
        lines = [f"tracemalloc: current {current >> 20} MiB, peak {peak >> 20} MiB"]
        for stat in snap.statistics("traceback")[:15]:
            lines.append(f"  {stat.size >> 10} KiB in {stat.count} blocks")
            lines += [f"    {frame}" for frame in stat.traceback.format()[-6:]]
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()

    signal.signal(signal.SIGUSR1, dump)


def main() -> None:
    env = os.environ
    if env.get("MESHBENCH_TRACEMALLOC") == "1":
        _trace_on_usr1()
    if env.get("MESHBENCH_WINDOW") or env.get("MESHBENCH_PKTSIZE"):
        _patch_listen(int(env.get("MESHBENCH_WINDOW") or 0) or None,
                      int(env.get("MESHBENCH_PKTSIZE") or 0) or None)
    if env.get("MESHBENCH_PIPE_SZ"):
        _patch_pipe(int(env["MESHBENCH_PIPE_SZ"]))
    if env.get("MESHBENCH_READ_SIZE"):
        from meshsshd.session import _io

        _io.READ_SIZE = int(env["MESHBENCH_READ_SIZE"])
    if env.get("MESHBENCH_HIGH_WATER"):
        from meshsshd.session import _io as _io_hw

        _io_hw.HIGH_WATER = int(env["MESHBENCH_HIGH_WATER"])
    if env.get("MESHBENCH_KEEP_IGNORE") == "1":
        from meshsshd import asyncssh_tuning

        asyncssh_tuning.skip_ignore_packets = lambda: False
    if env.get("MESHBENCH_COALESCE") == "1":
        _patch_coalesce()
    if env.get("MESHBENCH_ASYNCIO_LOOP") == "1":
        sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` fails
    from meshsshd.cli import main as meshsshd_main

    sys.argv[0] = "meshsshd"
    meshsshd_main()


if __name__ == "__main__":
    main()
