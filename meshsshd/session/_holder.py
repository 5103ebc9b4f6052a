"""Holder of one detached session: owns the child, its PTY master or pipes, and the spool.

Run by path (`python -I -S _holder.py`, standard library only, like the PAM helper) so
it starts fast and imports nothing of the daemon. The daemon (meshsshd/detached/)
writes a JSON spec on stdin and passes the PTY/pipe fds; the holder forks once more and
the intermediate exits, so the holder is re-parented to init in its own session: a
restart or crash of meshsshd does not touch it (WinRM's disconnected sessions, plus
survival of the server itself).

The holder then:
- spawns the child as the user with `Popen(user=, group=, extra_groups=)`: unlike the
  daemon (which uses setpriv, see `_spawn`), this process is small and single-threaded,
  so the fork that Popen then makes is cheap; the child starts in `/` and its argv
  enters the home directory with the user's rights;
- keeps the output in a bounded in-memory spool of (stream, bytes) records; when over
  `spool_limit` the oldest bytes go and a counter grows (readers see
  "[meshsshd: N bytes dropped]"); memory is bounded by the limit plus one read;
- answers on a unix socket in the root-only sessions directory (and checks SO_PEERCRED
  is root); requests are one JSON line, then frames both ways;
- when the child has exited and its output is drained: writes `<id>.spool` (the spool
  as frames) and the final `<id>.json`, tells connected clients, removes the socket and
  exits. The daemon serves finished sessions from those files and prunes them.

Frames: 1 type byte, 4-byte big-endian length, payload. Holder → client: `o` stdout,
`e` stderr, `x` end (JSON: state, exit status/signal, reason). Client → holder (attach):
`i` input (PTY sessions only), `w` window size (JSON cols/rows).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import importlib.util
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

READ_SIZE = 65536
CLIENT_HIGH_WATER = 1 << 20
KILL_GRACE = 2.0
DRAIN_GRACE = 2.0
HEADER = struct.Struct(">cI")


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


class Spool:
    """Bounded output record list: the oldest bytes are dropped first (and counted)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.records: collections.deque[list] = collections.deque()   # [stream byte, bytearray]
        self.size = 0
        self.dropped = 0

    def add(self, stream: bytes, data: bytes) -> None:
        if self.records and self.records[-1][0] == stream and len(self.records[-1][1]) < READ_SIZE:
            self.records[-1][1] += data
        else:
            self.records.append([stream, bytearray(data)])
        self.size += len(data)
        while self.size > self.limit:
            head = self.records[0]
            excess = self.size - self.limit
            if len(head[1]) <= excess:
                self.records.popleft()
                self.size -= len(head[1])
                self.dropped += len(head[1])
            else:
                del head[1][:excess]
                self.size -= excess
                self.dropped += excess

    def frames(self, tail: int | None = None, marker_stream: bytes = b"e") -> bytes:
        """The spool as frames, optionally only its last `tail` bytes; with the marker."""
        out = bytearray()
        skip = max(0, self.size - tail) if tail is not None else 0
        dropped = self.dropped + skip
        if dropped:
            nl = b"\r\n" if marker_stream == b"o" else b"\n"
            out += frame(marker_stream, f"[meshsshd: {dropped} bytes dropped]".encode() + nl)
        for stream, data in self.records:
            if skip >= len(data):
                skip -= len(data)
                continue
            out += frame(stream, bytes(data[skip:]))
            skip = 0
        return bytes(out)


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        # Lengths of the frame-aligned units queued in outbuf, and how much of the first
        # one is sent: a lagging follower can then skip whole frames, never half of one.
        self.units: collections.deque[list] = collections.deque()   # [length, marker count | None]
        self.head_sent = 0
        self.mode = ""          # "" (request pending), "receive", "follow", "attach"
        self.closing = False


class Holder:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.id = spec["id"]
        self.dir = spec["dir"]
        self.pty = bool(spec["pty"])
        self.spool = Spool(int(spec["spool_limit"]))
        self.sel = selectors.DefaultSelector()
        self.clients: list[Client] = []
        self.attached: Client | None = None
        self.readers: dict[int, bytes] = {}    # fd → stream byte
        self.stdin_fd = -1
        self.stdin_buf = bytearray()
        self.proc: subprocess.Popen | None = None
        self.pidfd = -1
        self.exit: dict | None = None
        self.exited_at = 0.0
        self.kill_at = 0.0
        self.paused = False
        self.listener: socket.socket | None = None
        self.meta = dict(spec["meta"])

    # ---- start ----------------------------------------------------------------------
    def spawn(self) -> None:
        s = self.spec
        kwargs: dict = dict(executable=s["executable"], stdin=s["child_fds"][0], stdout=s["child_fds"][1],
                            stderr=s["child_fds"][2], env=s["env"], close_fds=True, restore_signals=True,
                            umask=0o022, start_new_session=not self.pty)
        if not s["as_root"] and (os.geteuid() == 0 or s["uid"] != os.geteuid()):
            kwargs.update(user=s["uid"], group=s["gid"], extra_groups=list(s["groups"]))
        # Started in "/": the argv enters the home directory after the drop (see
        # `_spawn.build_home_argv`; the PAM helper does it itself), never as root.
        self.proc = subprocess.Popen(s["argv"], cwd="/", **kwargs)
        for fd in set(s["child_fds"]):
            os.close(fd)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.sel.register(self.pidfd, selectors.EVENT_READ, ("child", None))
        if self.pty:
            master = s["parent_fds"][0]
            os.set_blocking(master, False)
            self.stdin_fd = master
            self.readers[master] = b"o"
        else:
            # A detached command without a PTY reads /dev/null (as `nohup`): nothing
            # could ever answer it, and an attach must not close its input by accident.
            out_r, err_r = s["parent_fds"]
            for fd in (out_r, err_r):
                os.set_blocking(fd, False)
            self.readers[out_r] = b"o"
            self.readers[err_r] = b"e"
        for fd in self.readers:
            self.sel.register(fd, selectors.EVENT_READ, ("out", fd))
        self.meta.update(state="running", holder_pid=os.getpid(), pid=self.proc.pid)

    def listen(self) -> None:
        """Bind `<id>.sock` relative to the sessions dir (paths may exceed sun_path)."""
        os.chdir(self.dir)
        name = f"{self.id}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(name)
        finally:
            os.umask(old)
        sock.listen(16)
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, ("listen", None))

    def write_meta(self) -> None:
        self.meta["dropped"] = self.spool.dropped
        write_json_atomic(os.path.join(self.dir, f"{self.id}.json"), self.meta)

    # ---- loop -----------------------------------------------------------------------
    def run(self) -> None:
        while True:
            timeout = None
            now = time.monotonic()
            if self.kill_at:
                timeout = max(0.0, self.kill_at - now)
            if self.stdin_buf:
                timeout = 0.05
            if self.exit is not None:
                rest = max(0.0, self.exited_at + DRAIN_GRACE - now)
                timeout = rest if timeout is None else min(timeout, rest)
            for key, events in self.sel.select(timeout):
                kind, arg = key.data
                if kind == "child":
                    self.child_exited()
                elif kind == "out":
                    self.read_output(arg)
                elif kind == "listen":
                    self.accept()
                elif kind == "client":
                    self.client_io(arg, events)
            self.flush_stdin()
            now = time.monotonic()
            if self.kill_at and now >= self.kill_at and self.exit is None:
                self.kill_at = 0.0
                self.signal_group(signal.SIGKILL)
            if self.exit is not None and (not self.readers or now >= self.exited_at + DRAIN_GRACE):
                self.finish()
                return

    # ---- child output ---------------------------------------------------------------
    def read_output(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if not data:
            self.close_reader(fd)
            return
        stream = self.readers[fd]
        self.spool.add(stream, data)
        chunk = frame(stream, data)
        for c in list(self.clients):
            if c.mode in ("follow", "attach"):
                self.send(c, chunk)
        self.update_pause()

    def close_reader(self, fd: int) -> None:
        if fd in self.readers:
            del self.readers[fd]
            if not self.paused:
                self.sel.unregister(fd)
            if fd != self.stdin_fd:
                os.close(fd)

    def update_pause(self) -> None:
        """Backpressure: a slow attached client stops reading from the child (as a
        terminal would); slow followers are dropped instead."""
        for c in list(self.clients):
            if c.mode == "follow" and len(c.outbuf) > CLIENT_HIGH_WATER:
                self.skip_ahead(c)
        slow = self.attached is not None and len(self.attached.outbuf) > CLIENT_HIGH_WATER
        if slow and not self.paused:
            self.paused = True
            for fd in self.readers:
                self.sel.unregister(fd)
        elif not slow and self.paused:
            self.paused = False
            for fd in self.readers:
                self.sel.register(fd, selectors.EVENT_READ, ("out", fd))

    def child_exited(self) -> None:
        assert self.proc is not None
        try:
            pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.proc.pid, 0
        if pid == 0:
            return
        self.sel.unregister(self.pidfd)
        os.close(self.pidfd)
        if os.WIFSIGNALED(status):
            try:
                name = signal.Signals(os.WTERMSIG(status)).name.removeprefix("SIG")
            except ValueError:
                name = str(os.WTERMSIG(status))
            self.exit = {"exit_status": None, "exit_signal": name}
        else:
            self.exit = {"exit_status": os.waitstatus_to_exitcode(status), "exit_signal": None}
        self.exited_at = time.monotonic()
        self.kill_at = 0.0
        if self.paused:
            self.paused = False
            for fd in self.readers:
                self.sel.register(fd, selectors.EVENT_READ, ("out", fd))
        # Read what is buffered now (a background job may keep a pty/pipe open: the
        # loop gives it DRAIN_GRACE seconds, then the session is finished anyway).
        for fd in list(self.readers):
            for _ in range(64):
                if fd not in self.readers:
                    break
                before = self.spool.size + self.spool.dropped
                self.read_output(fd)
                if self.spool.size + self.spool.dropped == before:
                    break

    def finish(self) -> None:
        assert self.exit is not None
        self.meta.update(state="exited", finished=time.time(), **self.exit)
        self.meta["holder_pid"] = None
        for fd in list(self.readers):
            self.close_reader(fd)
        spool_path = os.path.join(self.dir, f"{self.id}.spool")
        fd = os.open(spool_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.spool.frames(marker_stream=self.marker_stream))
        os.replace(spool_path + ".tmp", spool_path)
        self.write_meta()
        end = frame(b"x", json.dumps(self.end_doc()).encode())
        for c in list(self.clients):
            if c.mode in ("follow", "attach"):
                self.send(c, end)
                c.closing = True
        deadline = time.monotonic() + 5.0
        while any(c.outbuf for c in self.clients) and time.monotonic() < deadline:
            for key, events in self.sel.select(0.2):
                if key.data[0] == "client":
                    self.client_io(key.data[1], events)
        try:
            os.unlink(os.path.join(self.dir, f"{self.id}.sock"))
        except FileNotFoundError:
            pass

    @property
    def marker_stream(self) -> bytes:
        return b"o" if self.pty else b"e"

    def end_doc(self, **extra: object) -> dict:
        doc = {"state": self.meta["state"], "exit_status": self.meta.get("exit_status"),
               "exit_signal": self.meta.get("exit_signal")}
        doc.update(extra)
        return doc

    # ---- child input ----------------------------------------------------------------
    def write_stdin(self, data: bytes) -> None:
        """Input reaches only PTY sessions; a full master is retried from the loop."""
        if self.stdin_fd < 0 or self.exit is not None or len(self.stdin_buf) > CLIENT_HIGH_WATER:
            return
        self.stdin_buf += data
        self.flush_stdin()

    def flush_stdin(self) -> None:
        if not self.stdin_buf or self.stdin_fd < 0:
            return
        try:
            n = os.write(self.stdin_fd, self.stdin_buf)
        except BlockingIOError:
            n = 0
        except OSError:
            self.stdin_buf.clear()
            return
        del self.stdin_buf[:n]

    def signal_group(self, signum: int) -> None:
        if self.proc is None or self.exit is not None:
            return
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def resize(self, cols: int, rows: int, redraw: bool) -> None:
        """New window size; with redraw, make the foreground job repaint (SIGWINCH comes
        from the kernel only when the size changes, so step through a different size)."""
        if not self.pty or self.stdin_fd < 0 or not cols or not rows:
            return
        try:
            if redraw:
                fcntl.ioctl(self.stdin_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, max(1, cols - 1), 0, 0))
            fcntl.ioctl(self.stdin_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError:
            pass
        self.meta["cols"], self.meta["rows"] = cols, rows

    # ---- clients --------------------------------------------------------------------
    def accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != 0 and uid != os.geteuid():
            sock.close()
            return
        sock.setblocking(False)
        c = Client(sock)
        self.clients.append(c)
        self.sel.register(sock, selectors.EVENT_READ, ("client", c))

    def client_io(self, c: Client, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self.flush_client(c)
            if c not in self.clients:
                return
        if events & selectors.EVENT_READ:
            try:
                data = c.sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.drop(c)
                return
            c.inbuf += data
            self.parse_client(c)

    def parse_client(self, c: Client) -> None:
        if not c.mode:
            nl = c.inbuf.find(b"\n")
            if nl < 0:
                if len(c.inbuf) > 65536:
                    self.drop(c)
                return
            try:
                req = json.loads(bytes(c.inbuf[:nl]))
            except ValueError:
                self.drop(c)
                return
            del c.inbuf[:nl + 1]
            self.request(c, req)
        while c.mode == "attach" and len(c.inbuf) >= HEADER.size:
            kind, size = HEADER.unpack_from(c.inbuf)
            if len(c.inbuf) < HEADER.size + size:
                break
            payload = bytes(c.inbuf[HEADER.size:HEADER.size + size])
            del c.inbuf[:HEADER.size + size]
            if c is not self.attached:
                continue
            if kind == b"i":
                self.write_stdin(payload)
            elif kind == b"w":
                try:
                    win = json.loads(payload)
                    self.resize(int(win["cols"]), int(win["rows"]), False)
                except (ValueError, KeyError, TypeError):
                    pass

    def request(self, c: Client, req: dict) -> None:
        op = req.get("op")
        if op == "status":
            self.meta["dropped"] = self.spool.dropped
            self.send(c, json.dumps(self.meta).encode() + b"\n")
            c.closing = True
        elif op == "kill":
            signum = getattr(signal, "SIG" + str(req.get("signal", "HUP")).upper(), signal.SIGHUP)
            self.signal_group(signum)
            if signum != signal.SIGKILL:
                self.signal_group(signal.SIGTERM)
                self.signal_group(signal.SIGCONT)
                self.kill_at = time.monotonic() + KILL_GRACE
            self.send(c, b'{"ok": true}\n')
            c.closing = True
        elif op == "receive":
            self.send(c, json.dumps({"ok": True, "pty": self.pty}).encode() + b"\n")
            self.send(c, self.spool.frames(marker_stream=self.marker_stream))
            if req.get("follow"):
                c.mode = "follow"
            else:
                self.send(c, frame(b"x", json.dumps(self.end_doc()).encode()))
                c.closing = True
        elif op == "attach":
            old = self.attached
            if old is not None:
                self.send(old, frame(b"x", json.dumps(self.end_doc(reason="attached elsewhere")).encode()))
                old.closing = True
                old.mode = "receive"
            self.attached = c
            c.mode = "attach"
            self.send(c, json.dumps({"ok": True, "pty": self.pty}).encode() + b"\n")
            tail = int(req.get("replay", 65536))
            self.send(c, self.spool.frames(tail=max(0, tail), marker_stream=self.marker_stream))
            self.resize(int(req.get("cols") or 0), int(req.get("rows") or 0), True)
        else:
            self.send(c, b'{"ok": false, "error": "unknown request"}\n')
            c.closing = True

    def skip_ahead(self, c: Client) -> None:
        """A follower more than CLIENT_HIGH_WATER behind: drop what it has not started
        to receive, as the spool drops its oldest output, and say so in its stream (one
        marker with the running total: a marker not yet sent is folded into the next)."""
        units = list(c.units)
        start = 0
        kept: collections.deque[list] = collections.deque()
        if c.head_sent and units:
            kept.append(units.pop(0))
            start = kept[0][0] - c.head_sent
        dropped = 0
        pos = start
        for length, marker in units:
            if marker is not None:
                dropped += marker
            else:
                view = c.outbuf[pos:pos + length]
                while len(view) >= HEADER.size:
                    kind, size = HEADER.unpack_from(view)
                    if kind in (b"o", b"e"):
                        dropped += size
                    view = view[HEADER.size + size:]
            pos += length
        del c.outbuf[start:]
        c.units = kept
        text = f"\r\n[meshsshd: {dropped} bytes dropped]\r\n" if self.pty else f"[meshsshd: {dropped} bytes dropped]\n"
        self.send(c, frame(self.marker_stream, text.encode()), marker=dropped)

    def send(self, c: Client, data: bytes, marker: int | None = None) -> None:
        if c not in self.clients or not data:
            return
        had = bool(c.outbuf)
        c.outbuf += data
        c.units.append([len(data), marker])
        if not had:
            self.flush_client(c)

    def flush_client(self, c: Client) -> None:
        try:
            n = c.sock.send(c.outbuf) if c.outbuf else 0
        except BlockingIOError:
            n = 0
        except OSError:
            self.drop(c)
            return
        del c.outbuf[:n]
        c.head_sent += n
        while c.units and c.head_sent >= c.units[0][0]:
            c.head_sent -= c.units.popleft()[0]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.outbuf else 0)
        self.sel.modify(c.sock, want, ("client", c))
        if not c.outbuf and c.closing:
            self.drop(c)
        elif c is self.attached:
            self.update_pause()

    def drop(self, c: Client) -> None:
        if c not in self.clients:
            return
        self.clients.remove(c)
        self.sel.unregister(c.sock)
        c.sock.close()
        if c is self.attached:
            self.attached = None
            self.update_pause()


def end_login(spec: dict, child_pid: int | None) -> None:
    """Last act: SIGKILL what is left of the session (what escaped the child's process
    group: setsid, nohup, job-control jobs), as the daemon does for its own sessions:
    the session's cgroup, this holder included, or without one the user's processes
    still in the child's session. `session/_cgroup.py` needs the standard library only
    and is loaded by path. The daemon removes the cgroup when it forgets the session."""
    if child_pid is None:
        return
    where = importlib.util.spec_from_file_location(
        "meshsshd_holder_cgroup", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cgroup.py"))
    assert where is not None and where.loader is not None
    cgroups = importlib.util.module_from_spec(where)
    where.loader.exec_module(cgroups)
    cgroup = cgroups.LoginCgroup(cgroups.Path(spec["cgroup"])) if spec.get("cgroup") else None
    cgroups.kill_login(cgroup, child_pid, int(spec["uid"]))


def _daemonize() -> None:
    """Second fork: the first child exits at once, so the holder belongs to init."""
    if os.fork() > 0:
        os._exit(0)


def main() -> int:
    spec = json.loads(sys.stdin.buffer.read())
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _daemonize()
    holder = Holder(spec)
    reply: dict
    try:
        holder.spawn()
        holder.listen()
        holder.write_meta()
        reply = {"ok": True, "holder_pid": os.getpid(), "pid": holder.proc.pid if holder.proc else None}
    except OSError as exc:
        reply = {"ok": False, "error": exc.strerror or str(exc)}
    os.write(1, json.dumps(reply).encode() + b"\n")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    if not reply["ok"]:
        return 1
    child_pid = holder.proc.pid if holder.proc else None
    holder.run()
    end_login(spec, child_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
