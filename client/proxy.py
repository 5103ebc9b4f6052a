"""`meshssh proxy HOST PORT`: OpenSSH's ProxyCommand for mesh peers.

OpenSSH cannot send our per-peer JWT (it truncates passwords at 1023 bytes and knows
nothing of management), so the proxy is an SSH man-in-the-middle that the user owns:

    ssh ──pipes──▶ [outer SSH server, ephemeral host key, "none" auth]
                        │ relay of every channel and request
                        ▼
                   [asyncssh client: host key from the peer list, JWT as password] ──▶ meshsshd

The outer key is ephemeral, so the drop-in turns host-key checking off for that one
hop; the real check happens here, against the key management published, before any
byte of the user's reaches the peer. Relayed: shell/exec/subsystems (sftp) with PTY
requests, terminal modes, window changes, env, signals, break, exit status and
exit-signal; direct-tcpip (-L/-D); tcpip-forward with the forwarded connections back
(-R); agent forwarding (-A) through the outer connection's agent channel.

Start-up is on the critical path of every `ssh`, so: nothing is imported before it is
needed, the peer list and token come from the short-lived caches, and with `--user`
(the drop-in passes `%r`) the connection to the peer is dialled while OpenSSH is still
doing its own key exchange with us.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import TYPE_CHECKING, Any

from .errors import ClientError

if TYPE_CHECKING:
    from .connect import Stdio

class _End(asyncio.Protocol):
    """One end of the stdin/stdout ↔ socket bridge.

    Data read here is written to `sink`; when *our* transport's write buffer fills,
    `feeder` (the transport whose data we are writing) is paused — back-pressure both ways.
    """

    def __init__(self, name: str, done: asyncio.Future) -> None:
        self.name = name
        self.done = done
        self.transport: Any = None
        self.sink: Any = None
        self.feeder: Any = None
        self.early: list[bytes] = []  # read before the sink was attached
        self.early_eof = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def attach(self, sink: Any) -> None:
        self.sink = sink
        for data in self.early:
            sink.write(data)
        self.early.clear()
        if self.early_eof:
            self.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.sink is None:
            self.early.append(data)
        elif not self.sink.is_closing():
            self.sink.write(data)

    def eof_received(self) -> bool:
        if self.sink is None:
            self.early_eof = True
        elif self.sink.can_write_eof():
            self.sink.write_eof()
        else:
            self.sink.close()
        return False

    def pause_writing(self) -> None:
        if self.feeder is not None:
            self.feeder.pause_reading()

    def resume_writing(self) -> None:
        if self.feeder is not None:
            self.feeder.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.name)


async def _bridge_stdio(sock: socket.socket, done: asyncio.Future, io: Stdio) -> list[Any]:
    """stdin → sock, sock → stdout; returns the transports to close at the end.

    OpenSSH hands a ProxyCommand two pipes; asyncssh's `run_server` wants one socket.
    """
    loop = asyncio.get_running_loop()
    e_in, e_out, e_sock = _End("stdin", done), _End("stdout", done), _End("socket", done)
    t_in, _ = await loop.connect_read_pipe(lambda: e_in, os.fdopen(os.dup(io.stdin), "rb", 0))
    t_out, _ = await loop.connect_write_pipe(lambda: e_out, os.fdopen(os.dup(io.stdout), "wb", 0))
    t_sock, _ = await loop.create_connection(lambda: e_sock, sock=sock)
    e_sock.feeder, e_out.feeder = t_in, t_sock
    e_in.attach(t_sock)
    e_sock.attach(t_out)
    return [t_in, t_out, t_sock]


def _classes() -> tuple[type, type, type]:
    """asyncssh subclasses, built on first use (keeps `import meshssh_client.proxy` cheap)."""
    import asyncssh
    from asyncssh.forward import SSHForwarder

    class BackendSession(asyncssh.SSHClientSession):
        """The peer's side of one relayed session: its output goes to OpenSSH."""

        def __init__(self, outer: Any) -> None:
            self.outer = outer
            self.chan: Any = None

        def connection_made(self, chan: Any) -> None:
            self.chan = chan

        def data_received(self, data: bytes, datatype: Any) -> None:
            self.outer.chan.write(data, datatype)

        def eof_received(self) -> bool:
            with contextlib.suppress(Exception):
                self.outer.chan.write_eof()
            return True  # keep the channel for exit-status

        def pause_writing(self) -> None:
            self.outer.chan.pause_reading()

        def resume_writing(self) -> None:
            self.outer.chan.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            self.outer.backend_closed(self.chan)

    class RelaySession(asyncssh.SSHServerSession):
        """OpenSSH's side of one session: every request is replayed on the peer."""

        def __init__(self, relay: Relay) -> None:
            self.relay = relay
            self.chan: Any = None
            self.backend: Any = None
            self.pty: tuple[str, Any, Any] | None = None
            self.pending: list[bytes] = []
            self.eof = False
            self.closed = False

        def connection_made(self, chan: Any) -> None:
            self.chan = chan

        def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
            self.pty = (term_type, term_size, dict(term_modes))
            return True

        def shell_requested(self) -> Any:
            return self._open(None, None)

        def exec_requested(self, command: str) -> Any:
            return self._open(command, None)

        def subsystem_requested(self, subsystem: str) -> Any:
            return self._open(None, subsystem)

        def _open(self, command: str | None, subsystem: str | None) -> Any:
            """Open the peer's session before answering OpenSSH, so a refusal there is a
            refusal here ("exec request failed"). asyncssh answers synchronously; the
            channel's `_report_response` is how its own agent request answers later."""
            report = getattr(self.chan, "_report_response", None)
            task = asyncio.ensure_future(self._open_backend(command, subsystem))
            if report is None:  # pragma: no cover - older asyncssh: accept, fail later
                return True

            def finished(t: asyncio.Future) -> None:
                exc = None if t.cancelled() else t.exception()
                if exc is not None:
                    self.relay.say(f"{self.relay.name}: session failed: {type(exc).__name__}: {exc}")
                ok = (not t.cancelled()) and exc is None and t.result()
                report(bool(ok))
            task.add_done_callback(finished)
            return None

        async def _open_backend(self, command: str | None, subsystem: str | None) -> bool:
            conn = await self.relay.backend_conn()
            if conn is None:
                return False
            agent = await self.relay.agent_for(self.chan.get_agent_path())
            if agent:
                self.relay.enable_agent(conn, agent)
            kw: dict[str, Any] = dict(command=command, subsystem=subsystem, encoding=None,
                                      env=dict(self.chan.get_environment_bytes()))
            if self.pty is not None:
                term_type, term_size, term_modes = self.pty
                kw.update(request_pty="force", term_type=term_type, term_size=term_size,
                          term_modes=term_modes)
            else:
                kw.update(request_pty=False)
            try:
                chan, _ = await conn.create_session(lambda: BackendSession(self), **kw)
            except (asyncssh.Error, OSError) as exc:
                what = subsystem and f"subsystem {subsystem}" or command and "command" or "shell"
                self.relay.say(f"{self.relay.name}: {what} refused: {getattr(exc, 'reason', exc)}")
                return False
            self.backend = chan
            if self.closed:
                chan.close()
                return True
            for data in self.pending:
                chan.write(data)
            self.pending.clear()
            if self.eof:
                chan.write_eof()
            return True

        def data_received(self, data: bytes, datatype: Any) -> None:
            if self.backend is None:
                self.pending.append(data)
            else:
                self.backend.write(data)

        def eof_received(self) -> bool:
            self.eof = True
            if self.backend is not None:
                with contextlib.suppress(Exception):
                    self.backend.write_eof()
            return True

        def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
            if self.backend is not None:
                self.backend.change_terminal_size(width, height, pixwidth, pixheight)

        def signal_received(self, signal: str) -> None:
            if self.backend is not None:
                self.backend.send_signal(signal)

        def break_received(self, msec: int) -> bool:
            if self.backend is not None:
                self.backend.send_break(msec)
                return True
            return False

        def pause_writing(self) -> None:
            if self.backend is not None:
                self.backend.pause_reading()

        def resume_writing(self) -> None:
            if self.backend is not None:
                self.backend.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            self.closed = True
            if self.backend is not None:
                self.backend.close()

        def backend_closed(self, chan: Any) -> None:
            """The peer finished: report how, exactly as it reported it to us."""
            if self.closed:
                return
            sig = chan.get_exit_signal()
            status = chan.get_exit_status()
            try:
                if sig is not None:
                    name, core, msg, lang = sig
                    self.chan.exit_with_signal(name, core, msg, lang)
                elif status is not None and status >= 0:
                    self.chan.exit(status)
                else:
                    self.chan.close()
            except (OSError, asyncssh.Error):
                self.chan.close()

    class RelayServer(asyncssh.SSHServer):
        """The outer server OpenSSH talks to; one per proxy process."""

        def __init__(self, relay: Relay) -> None:
            self.relay = relay

        def connection_made(self, conn: Any) -> None:
            self.relay.outer = conn

        def connection_lost(self, exc: Exception | None) -> None:
            self.relay.outer_closed()

        async def begin_auth(self, username: str) -> bool:
            conn = await self.relay.backend_conn(username)
            if conn is None:
                self.relay.outer.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                            self.relay.failure or "refused")
                return True
            return False  # the peer authenticated us; OpenSSH needs nothing more

        def session_requested(self) -> Any:
            return RelaySession(self.relay)

        def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                                 orig_port: int) -> Any:
            if self.relay.backend is None:
                return False
            return self.relay.direct(dest_host, dest_port)

        def unix_connection_requested(self, dest_path: str) -> Any:
            return self.relay.backend

        async def server_requested(self, listen_host: str, listen_port: int) -> Any:
            return await self.relay.remote_forward(listen_host, listen_port)

    Relay.forwarder = SSHForwarder
    return RelayServer, RelaySession, BackendSession


class Relay:
    """State shared by the outer server and the backend connection of one proxy run."""

    forwarder: Any = None

    def __init__(self, host: str, port: int, session: Any, guess_user: str | None, io: Stdio) -> None:
        self.io = io  # OpenSSH's pipes and stderr: ours, or passed to the control master
        self.host = host
        self.port = port
        self.session = session
        self.guess_user = guess_user
        self.target: Any = None
        self.name = host
        self.outer: Any = None
        self.backend: Any = None
        self.failure: str | None = None
        self._dial: asyncio.Task | None = None
        self._dial_user: str | None = None
        self._prepared: asyncio.Future | None = None
        self._token: asyncio.Future | None = None
        self.broker: Any = None
        self.finished = asyncio.get_running_loop().create_future()

    def say(self, text: str) -> None:
        """The proxy's stderr is the user's terminal; OpenSSH hides banners at LogLevel ERROR."""
        self.io.say(f"meshssh: {text}")

    def start_early(self) -> None:
        """Resolve the peer and fetch its token while OpenSSH does its key exchange with
        us. The login name is known only at OpenSSH's first userauth request — unless
        `--user` was given — so the dial itself waits for it. (The drop-in does not pass
        `%r`: OpenSSH before 9.6 puts it into the shell command unchecked, and a hostile
        `ssh://…@peer` URL could then run commands here.)"""
        self._prepared = asyncio.ensure_future(self._prepare())
        if self.guess_user:
            self._dial = asyncio.ensure_future(self._connect(self.guess_user))
            self._dial_user = self.guess_user

    async def _prepare(self) -> None:
        from .target import resolve

        self.target = await asyncio.to_thread(resolve, self.host, self.session, self.port, None)
        self.name = self.target.name
        self._token = asyncio.ensure_future(asyncio.to_thread(
            self.session.ssh_token, self.target.peer.id, self.target.name))

    async def _connect(self, username: str) -> Any:
        from .connect import dial_verified
        from .target import choose_source_address

        try:
            await self._prepared
            self.target.username = username
            token, self._token = self._token, None  # a token is good for one login only
            source = choose_source_address(None, self.session.login.management_url, self.io.environ,
                                           exclude=self.target.address)
            conn = await dial_verified(self.target, self.session, source=source, agent_path=None,
                                       say=self.io.say,
                                       client_keys=None, keepalive=30.0, prefetch=token)
        except ClientError as exc:
            self.failure = str(exc)
            self.say(str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 — OpenSSH must get a reason, not a hang
            self.failure = f"{self.name}: {type(exc).__name__}: {exc}"
            self.say(self.failure)
            return None
        conn_closed = asyncio.ensure_future(conn.wait_closed())
        conn_closed.add_done_callback(lambda _: self.backend_lost())
        return conn

    async def backend_conn(self, username: str | None = None) -> Any:
        """The authenticated connection to the peer, dialled once per login name."""
        if username is not None and (self._dial is None or self._dial_user != username):
            if self._dial is not None:
                old = self._dial
                self._dial = None
                with contextlib.suppress(BaseException):
                    c = await old
                    if c is not None:
                        c.close()
            self._dial_user = username
            self._dial = asyncio.ensure_future(self._connect(username))
        if self._dial is None:
            return None
        self.backend = await self._dial
        return self.backend

    async def agent_for(self, outer: str | None) -> str | None:
        """What the peer's agent channels reach: OpenSSH's agent (`ssh -A`), or — with
        MESHSSH_DELEGATE_TO=LIST in ssh's environment — the token broker, which passes
        agent requests on to OpenSSH's agent when there is one (docs/delegation.md)."""
        delegate = self.io.environ.get("MESHSSH_DELEGATE_TO", "").strip()
        if not delegate or self.target is None:
            return outer
        if self.broker is None:
            from .broker import start_broker
            from .options import parse_budget

            env = self.io.environ
            self.broker = await start_broker(self.session, self.target.peer, [delegate], bool(outer),
                                             upstream=outer, budget=parse_budget(env.get("MESHSSH_DELEGATE_MAX") or None),
                                             confirm=env.get("MESHSSH_DELEGATE_CONFIRM", "") in ("1", "yes"))
        return self.broker.path if self.broker is not None else outer

    @staticmethod
    def enable_agent(conn: Any, path: str) -> None:
        """Let the peer's agent channels reach OpenSSH's agent through the outer
        connection. asyncssh decides agent forwarding per connection (from options);
        setting its path here once OpenSSH asked for -A keeps it per user request."""
        conn._agent_forward_path = path  # noqa: SLF001 — see docstring

    async def direct(self, dest_host: str, dest_port: int) -> Any:
        """A direct-tcpip channel (-L, -D, -W) tunnelled through the peer connection. The
        drop-in runs OpenSSH at LogLevel ERROR, which hides the peer's reason for a refusal
        ("open failed: ..." is INFO there): the proxy says it."""
        import asyncssh

        from .forwards import describe_open_failure

        try:
            return await self.outer.forward_tunneled_connection(self.backend, dest_host, dest_port)
        except asyncssh.ChannelOpenError as exc:
            self.say(f"{self.name}: forward to {dest_host}:{dest_port}: open failed: {describe_open_failure(exc)}")
            raise

    async def remote_forward(self, listen_host: str, listen_port: int) -> Any:
        import asyncssh

        from .forwards import notes_of

        conn = await self.backend_conn()
        if conn is None:
            return False
        holder: dict[str, Any] = {}

        async def accept(orig_host: str, orig_port: int) -> Any:
            port = holder["listener"].get_port() if listen_port == 0 else listen_port
            _, peer = await self.outer.create_connection(
                self.forwarder, listen_host, port, orig_host, orig_port)
            return self.forwarder(peer)

        notes = notes_of(conn)
        mark = notes.mark()
        try:
            listener = await conn.create_server(accept, listen_host, listen_port)
        except (asyncssh.ChannelListenError, asyncssh.Error, OSError) as exc:
            cause = notes.since(mark)
            if cause:   # OpenSSH's `ssh -v` shows it as "Remote: ...", as if it came from the peer
                self.outer.send_debug(f"meshsshd: {cause}")
            self.say(f"{self.name}: remote forward {listen_host}:{listen_port} refused: "
                     f"{cause or getattr(exc, 'reason', exc)}")
            return False
        holder["listener"] = listener
        return listener

    def backend_lost(self) -> None:
        if self.outer is not None:
            self.outer.close()
        if not self.finished.done():
            self.finished.set_result("backend")

    def outer_closed(self) -> None:
        if not self.finished.done():
            self.finished.set_result("outer")


async def run_proxy(host: str, port: int, user: str | None, session: Any, io: Stdio | None = None) -> int:
    """Relay OpenSSH on `io` (default: our stdin/stdout) to the peer; the exit code."""
    import asyncssh

    from .connect import Stdio

    server_cls, _, _ = _classes()
    relay = Relay(host, port, session, user, io or Stdio())
    relay.start_early()
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    bridge_done: asyncio.Future = loop.create_future()
    transports = await _bridge_stdio(ours, bridge_done, relay.io)
    key = asyncssh.generate_private_key("ssh-ed25519")
    try:
        conn = await asyncssh.run_server(
            theirs, server_factory=lambda: server_cls(relay), server_host_keys=[key],
            encoding=None, line_editor=False, allow_pty=True, agent_forwarding=True,
            x11_forwarding=False, login_timeout=120, config=None,
            server_version="meshssh_proxy",
        )
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
        if relay.failure is None and not isinstance(exc, asyncssh.ConnectionLost):
            relay.say(f"proxy: {getattr(exc, 'reason', exc)}")
        return 255
    waiters = [relay.finished, bridge_done]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    conn.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.wait_closed(), 5)
    if relay.backend is not None:
        relay.backend.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(relay.backend.wait_closed(), 5)
    for t in transports:
        t.close()
    if relay.broker is not None:
        await relay.broker.close()
    return 0 if relay.failure is None else 255


def main_proxy(host: str, port: int, user: str | None, ttl: str | None, no_cache: bool) -> int:
    from .auth import Session, parse_ttl

    try:
        session = Session(ttl=parse_ttl(ttl), no_cache=no_cache)
        return asyncio.run(run_proxy(host, port, user, session))
    except ClientError as exc:
        from .connect import Stdio

        Stdio().say(f"meshssh: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
