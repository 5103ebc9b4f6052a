"""The control master: one resident process per user that keeps logins to peers warm.

`meshssh host cmd` spends most of its time starting Python, importing asyncssh and
logging in; a session channel on a connection that is already authenticated costs a
few milliseconds. So, like OpenSSH's ControlMaster, the `meshssh` front
(client/front.py) passes its stdio descriptors here (client/control.py has the wire
format) and this process runs the session with client/connect.py's code, on a pooled
connection when one fits, and reports the exit status.

Rules that keep the mesh's guarantees:
- only our own uid may talk to us (SO_PEERCRED on every connection; the socket is 0600
  in a 0700 directory);
- a connection is reused only while the SSH token it logged in with is unexpired (its
  `exp`), so a short-lived token still bounds how long one login serves; a closed
  connection, or one whose channel open fails, is retired and the next request dials;
- host keys are checked by `dial` exactly as in-process; the peer re-evaluates policy
  on its live connections and disconnects revoked ones (meshsshd/server.py);
- we exit after MESHSSH_CONTROL_PERSIST seconds (default 600) without a session in
  progress, and on `meshssh control stop` / `meshssh logout`.
Log lines (stderr, which the front points at `control.log` beside the socket) name
events, peers and users — never tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import control
from .connect import Stdio, dial_for, finish_process, open_process, resolve_for
from .errors import ClientError, NotLoggedIn, UsageError
from .options import parse_ssh_args
from .target import Target, choose_source_address

log = logging.getLogger("meshssh.control")
REUSE_MARGIN = 5.0  # never start a session on a login whose token expires sooner than this
RECV_FDS = 3


class PoolKey(NamedTuple):
    """What a pooled connection must match to be reused (see pool_key)."""

    management_url: str
    identity: str
    peer_id: str
    address: str
    port: int
    user: str
    source: str | None
    host_keys: tuple[str, ...]
    login: str  # sha256 prefix of the stored refresh token or client secret


@dataclass
class _Pooled:
    conn: Any
    key: PoolKey
    token_exp: float | None
    users: int = 0
    retired: bool = False

    def usable(self, now: float) -> bool:
        return (not self.retired and not self.conn.is_closed() and self.token_exp is not None
                and self.token_exp - now > REUSE_MARGIN)


@dataclass
class Pool:
    """Authenticated connections by (management URL, identity, peer, port, login, source)."""

    entries: list[_Pooled] = field(default_factory=list)

    def take(self, key: PoolKey, now: float) -> _Pooled | None:
        self.sweep(now)
        for e in self.entries:
            if e.key == key and e.usable(now):
                e.users += 1
                return e
        return None

    def add(self, key: PoolKey, conn: Any) -> _Pooled:
        e = _Pooled(conn, key, conn.get_extra_info("meshssh_token_exp"), users=1)
        self.entries.append(e)
        conn_closed = asyncio.ensure_future(conn.wait_closed())
        conn_closed.add_done_callback(lambda _: self.retire(e, "closed"))
        log.info("dialled peer=%s port=%s user=%s", key.peer_id, key.port, key.user)
        return e

    def release(self, e: _Pooled) -> None:
        e.users -= 1
        self.sweep(time.time())

    def retire(self, e: _Pooled, why: str) -> None:
        if not e.retired:
            e.retired = True
            log.info("retired peer=%s user=%s reason=%s", e.key.peer_id, e.key.user, why)
        self.sweep(time.time())

    def sweep(self, now: float) -> None:
        """Close what may not be reused any more once no session runs on it."""
        keep = []
        for e in self.entries:
            if not e.usable(now) and not e.retired:
                e.retired = True
                log.info("retired peer=%s user=%s reason=token-expired", e.key.peer_id, e.key.user)
            if e.retired and e.users <= 0:
                e.conn.close()
            else:
                keep.append(e)
        self.entries = keep

    def close(self) -> None:
        for e in self.entries:
            e.conn.close()
        self.entries.clear()


class _Control:
    """One front's connection: its JSON lines both ways."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, **doc: Any) -> None:
        self.writer.write(control.encode(doc))
        await self.writer.drain()

    async def read(self) -> dict[str, Any] | None:
        import json

        line = await self.reader.readline()
        if not line:
            return None
        doc = json.loads(line)
        return doc if isinstance(doc, dict) else None


class Master:
    def __init__(self, persist: float) -> None:
        self.persist = persist
        self.pool = Pool()
        self.active = 0
        self.served = 0
        self.last_busy = time.monotonic()
        self.stopping = asyncio.Event()

    # ---- serving ------------------------------------------------------------------
    async def serve(self, path: os.PathLike) -> None:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: we hold the lock, so no master is behind it
        old = os.umask(0o177)
        try:
            srv.bind(os.fspath(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        srv.listen(64)
        srv.setblocking(False)
        log.info("started pid=%d persist=%ss", os.getpid(), self.persist)
        idle = asyncio.ensure_future(self._idle_watch())
        accept = asyncio.ensure_future(self._accept_loop(srv))
        await self.stopping.wait()
        accept.cancel()
        idle.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        srv.close()
        self.pool.close()
        log.info("stopped")

    async def _accept_loop(self, srv: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(srv)
            asyncio.ensure_future(self._handle(sock))

    async def _idle_watch(self) -> None:
        while True:
            await asyncio.sleep(min(max(self.persist / 4, 0.05), 5.0))
            self.pool.sweep(time.time())
            if self.active == 0 and time.monotonic() - self.last_busy >= self.persist:
                log.info("idle for %ss; exiting", self.persist)
                self.stopping.set()
                return

    async def _handle(self, sock: socket.socket) -> None:
        fds: list[int] = []
        try:
            uid = control.peer_uid(sock)
            if uid != os.geteuid():
                log.warning("refused uid=%d", uid)
                sock.close()
                return
            head, fds, rest = await _recv_request(sock)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            if rest:
                reader.feed_data(rest)
            ctl = _Control(reader, writer)
            try:
                await self._dispatch(head, fds, ctl)
            finally:
                writer.close()
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            log.info("request failed: %s", type(exc).__name__)
            sock.close()
        except Exception as exc:  # noqa: BLE001 — one request's bug must not end the master
            log.error("request failed: %s: %s", type(exc).__name__, exc)
            sock.close()
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def _dispatch(self, head: dict[str, Any], fds: list[int], ctl: _Control) -> None:
        op = head.get("op")
        if op == "status":
            await ctl.send(status=dict(pid=os.getpid(), active=self.active, served=self.served,
                                       connections=len(self.pool.entries), persist=self.persist))
            return
        if op == "stop":
            log.info("stop requested")
            await ctl.send(stopping=True)
            self.stopping.set()
            return
        if op not in ("session", "proxy") or len(fds) != RECV_FDS:
            await ctl.send(fallback="bad request")
            return
        self.active += 1
        self.served += 1
        try:
            environ = {str(k): str(v) for k, v in dict(head.get("environ") or {}).items()}
            argv = [str(a) for a in head.get("argv") or []]
            if op == "session":
                code = await self._session(argv, environ, fds, ctl)
            else:
                code = await self._proxy(argv, environ, fds, ctl)
            if code is not None:
                await ctl.send(exit=code)
        finally:
            self.active -= 1
            self.last_busy = time.monotonic()

    # ---- meshssh host cmd -----------------------------------------------------------
    async def _session(self, argv: list[str], environ: dict[str, str], fds: list[int],
                       ctl: _Control) -> int | None:
        import asyncssh

        from .auth import Session, parse_ttl

        io = Stdio(stdin=fds[0], stdout=fds[1], stderr=fds[2], environ=environ, own_terminal=False)
        try:
            args = parse_ssh_args(argv)
            session = Session(ttl=parse_ttl(environ.get("MESHSSH_SSH_JWT_CACHE_TTL")))
        except (UsageError, NotLoggedIn) as exc:
            # Usage text, or a delegated session (no login here): the in-process path knows.
            await ctl.send(fallback=type(exc).__name__)
            return None
        entry: _Pooled | None = None
        try:
            target = await resolve_for(args, session)
            source = choose_source_address(None, session.login.management_url, environ, exclude=target.address)
            process, pty, entry = await self._open(args, session, target, source, io)
            if process is None:
                return 255
            raw = pty and os.isatty(io.stdin)
            await ctl.send(started=True, raw=raw)
            if raw:
                ack = await ctl.read()
                if ack is None:
                    process.close()
                    return None
            watcher = asyncio.ensure_future(self._watch_front(ctl, io, process))
            try:
                return await finish_process(process, pty, target, args, io)
            finally:
                watcher.cancel()
        except ClientError as exc:
            io.say(f"meshssh: {exc}")
            return exc.exit_code
        except (asyncssh.Error, OSError) as exc:
            io.say(f"meshssh: {getattr(exc, 'reason', None) or exc}")
            return 255
        finally:
            if entry is not None:
                with contextlib.suppress(Exception):
                    entry.conn.get_owner().ctx.say = _log_say
                self.pool.release(entry)

    async def _open(self, args: Any, session: Any, target: Target, source: str | None,
                    io: Stdio) -> tuple[Any, bool, _Pooled | None]:
        """(process, pty, pool entry) on a pooled login if one fits, else on a new one;
        (None, False, entry) when the peer refuses the session (already said why)."""
        import asyncssh

        key = pool_key(session, target, source)
        entry = self.pool.take(key, time.time())
        if entry is not None:
            entry.conn.get_owner().ctx.say = io.say
            try:
                process, pty = await open_process(entry.conn, args, io)
                log.info("reused peer=%s user=%s", key.peer_id, key.user)
                return process, pty, entry
            except (asyncssh.Error, OSError) as exc:
                # Closed meanwhile, or refused on this login: a fresh login decides.
                self.pool.release(entry)
                self.pool.retire(entry, f"channel-open-failed:{type(exc).__name__}")
        conn = await dial_for(args, session, target, io)
        entry = self.pool.add(pool_key(session, target, source), conn)  # the login may have rotated
        try:
            process, pty = await open_process(conn, args, io)
        except asyncssh.ChannelOpenError as exc:
            io.say(f"{target.name}: session refused: {exc.reason}")
            return None, False, entry
        return process, pty, entry

    @staticmethod
    async def _watch_front(ctl: _Control, io: Stdio, process: Any) -> None:
        """Resizes from the front; its hang-up (killed, ^C) ends the remote session. A
        closed channel alone no longer does (the peer keeps a command the client closed
        until it exits, as sshd does), so the hang-up is sent first, as a terminal's would
        be; the in-process client gets the same end from its dropped connection."""
        while True:
            try:
                msg = await ctl.read()
            except (OSError, ValueError):
                msg = None
            if msg is None:
                with contextlib.suppress(Exception):
                    process.send_signal("HUP")
                process.close()
                return
            if msg.get("resize") and io.resize_hook is not None:
                io.resize_hook()

    # ---- meshssh proxy HOST PORT ------------------------------------------------------
    async def _proxy(self, argv: list[str], environ: dict[str, str], fds: list[int],
                     ctl: _Control) -> int | None:
        """The drop-in's ProxyCommand (client/proxy.py's Relay) on the passed pipes.

        Its peer connection is not pooled: it belongs to one OpenSSH connection (closed
        with it, agent forwarding and remote forwards set per connection, the login name
        known only at OpenSSH's userauth), so this saves the process start and imports."""
        from .auth import Session, parse_ttl
        from .proxy import run_proxy

        io = Stdio(stdin=fds[0], stdout=fds[1], stderr=fds[2], environ=environ, own_terminal=False)
        try:
            host, port = argv[1], int(argv[2])
            user = argv[4] if argv[3:4] == ["--user"] else None
            session = Session(ttl=parse_ttl(environ.get("MESHSSH_SSH_JWT_CACHE_TTL")))
        except (IndexError, ValueError, ClientError) as exc:
            await ctl.send(fallback=type(exc).__name__)
            return None
        await ctl.send(started=True, raw=False)
        try:
            return await run_proxy(host, port, user, session, io)
        except ClientError as exc:
            io.say(f"meshssh: {exc}")
            return exc.exit_code


def pool_key(session: Any, target: Target, source: str | None) -> PoolKey:
    """What a pooled connection must match to be reused. The stored login's secret is in
    it (hashed, in memory only): a new login, a refresh-token rotation or a restored old
    login file starts a fresh connection, which asks management again. So are the host
    keys the peer list publishes now: after a change the next session dials and checks."""
    import hashlib

    login = session.login
    secret = (login.refresh_token or login.client_secret or "").encode()
    return PoolKey(login.management_url, session.identity, target.peer.id, target.address,
                   target.port, target.username, source, tuple(target.peer.ssh_host_keys),
                   hashlib.sha256(secret).hexdigest()[:16])


def _log_say(text: str) -> None:
    """Where a pooled connection's messages go between sessions."""
    log.info("peer says: %s", text.strip().splitlines()[0] if text.strip() else "")


async def _recv_request(sock: socket.socket) -> tuple[dict[str, Any], list[int], bytes]:
    """The first line and the descriptors sent with it (SCM_RIGHTS), and any bytes after."""
    import json

    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    buf = b""
    fds: list[int] = []
    while b"\n" not in buf:
        if len(buf) > control.MAX_LINE:
            raise ValueError("request too long")
        fut: asyncio.Future = loop.create_future()
        loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, 30)
        finally:
            loop.remove_reader(sock.fileno())
        try:
            data, got, _flags, _addr = socket.recv_fds(sock, 65536, RECV_FDS)
        except BlockingIOError:
            continue
        fds.extend(got)
        if not data:
            raise ValueError("end of stream before the request")
        buf += data
    line, rest = buf.split(b"\n", 1)
    head = json.loads(line)
    if not isinstance(head, dict):
        raise ValueError("bad request")
    return head, fds, rest


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s meshssh-control: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    path = control.socket_path()
    control.ensure_socket_dir(path)
    lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another master won the race; the front connects to that one
    from . import userconfig

    try:
        persist = control.persist_seconds(userconfig.load().control_persist)
    except ClientError as exc:   # a broken config.toml: the front's own run names it
        log.warning("config: %s", exc)
        persist = control.persist_seconds()
    asyncio.run(Master(persist).serve(path))


if __name__ == "__main__":
    main()
