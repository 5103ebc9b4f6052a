"""Non-blocking fd pumps between a child's pipes/pty and an SSH channel.

Raw fds with `loop.add_reader`/`add_writer` instead of asyncio subprocess streams:
asyncssh's stream adapters race on pause/resume and can drop the whole connection on
large transfers (see research notes, pitfall (a)).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from collections.abc import Callable

# One read per wake-up drains up to this much; with 1 MiB pipes this quarters the reads
# and wake-ups of a bulk download compared with 64 KiB (bench/RESULTS.md, "Bulk").
READ_SIZE = 256 * 1024
PIPE_SIZE = 1 << 20
# asyncssh's default channel window. When a paused channel resumes, asyncssh re-opens the
# whole window before it has delivered what it already queued; if we paused again below
# that, every pause/resume cycle would add up to a window of queued data and a slow
# consumer could grow the daemon without bound (measured: 390–590 MiB for a 2 GiB upload).
# Pausing only above 4/3 of the window lets one resume drain the queue first.
SSH_WINDOW = 2 * 1024 * 1024
HIGH_WATER = 2 * SSH_WINDOW


def make_pipe() -> tuple[int, int]:
    """os.pipe() with a 1 MiB buffer where the kernel allows it (fewer syscalls per GiB)."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size for an unprivileged daemon: keep 64 KiB
    return r, w


class FdReader:
    """Reads an fd until EOF (or EIO from a pty master) and hands chunks on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 on_data: Callable[[bytes], None], on_eof: Callable[[], None],
                 *, owns_fd: bool = True) -> None:
        self._loop, self.fd, self._owns = loop, fd, owns_fd
        self._on_data, self._on_eof = on_data, on_eof
        self._paused = False
        self.eof = False
        self.bytes = 0
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _read(self) -> bytes | None:
        """One chunk; b"" at EOF (EIO is a pty master's EOF), None when nothing is ready."""
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EBADF):
                raise
            return b""

    def _readable(self) -> None:
        data = self._read()
        if data is None:
            return
        if data:
            self.bytes += len(data)
            self._on_data(data)
        else:
            self._finish()

    def drain(self) -> None:
        """Read whatever is buffered right now (after the child exited)."""
        while not self.eof:
            try:
                data = self._read()
            except OSError:
                data = b""
            if data is None:
                return
            if not data:
                self._finish()
                return
            self.bytes += len(data)
            self._on_data(data)

    def _finish(self) -> None:
        if not self.eof:
            self.eof = True
            self._loop.remove_reader(self.fd)
            self._on_eof()

    def pause(self) -> None:
        if not self._paused and not self.eof:
            self._paused = True
            self._loop.remove_reader(self.fd)

    def resume(self) -> None:
        if self._paused and not self.eof:
            self._paused = False
            self._loop.add_reader(self.fd, self._readable)

    def stop(self) -> None:
        """Stop reading, as if at EOF, without calling back."""
        if not self.eof:
            self.eof = True
            self._loop.remove_reader(self.fd)

    def close(self) -> None:
        """Stop reading; closes the fd too when this reader owns it."""
        if not self.eof:
            self.eof = True
            self._loop.remove_reader(self.fd)
        if self._owns and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FdWriter:
    """Buffers writes to an fd; tells the caller when to stop and restart reading input.

    Writes are collected for one turn of the loop and go out in one `write()`: asyncssh
    delivers every 32 KiB packet of a socket read to us one by one in the same turn, so
    writing each at once cost one syscall per packet on uploads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, *, owns_fd: bool,
                 on_pause: Callable[[], None], on_resume: Callable[[], None]) -> None:
        self._loop, self.fd, self._owns = loop, fd, owns_fd
        self._on_pause, self._on_resume = on_pause, on_resume
        self._buf = bytearray()
        self._eof_pending = False
        self._paused = False
        self._flush_due = False     # a flush is scheduled for the end of this loop turn
        self._waiting = False       # the fd was full: add_writer is registered
        self.closed = False
        self.bytes = 0
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        if self.closed or self._eof_pending:
            return
        self.bytes += len(data)
        self._buf += data
        if not self._flush_due and not self._waiting:
            self._flush_due = True
            self._loop.call_soon(self._flush)
        if len(self._buf) > HIGH_WATER and not self._paused:
            self._paused = True
            self._on_pause()

    def _flush(self) -> None:
        self._flush_due = False
        if self.closed:
            return
        self._writable()
        if self._buf and not self.closed and not self._waiting:
            self._waiting = True
            self._loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        try:
            n = os.write(self.fd, self._buf)
        except BlockingIOError:
            return
        except OSError:  # child closed its input (EPIPE): drop, as sshd does
            self._close()
            return
        del self._buf[:n]
        if not self._buf:
            if self._waiting:
                self._waiting = False
                self._loop.remove_writer(self.fd)
            if self._eof_pending:
                self._close()
                return
        if self._paused and len(self._buf) < HIGH_WATER // 4:
            self._paused = False
            self._on_resume()

    def write_eof(self) -> None:
        """Close the fd once everything buffered is written (child sees EOF)."""
        if not self._buf:
            self._close()
        else:
            self._eof_pending = True

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._waiting:
            self._waiting = False
            self._loop.remove_writer(self.fd)
        self._buf.clear()
        if self._owns:
            os.close(self.fd)
        if self._paused:
            self._paused = False
            self._on_resume()

    def close(self) -> None:
        self._close()
