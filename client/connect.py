"""Reaching a peer: resolve, verify its host key, authenticate with an SSH token, and
run `meshssh [options] [user@]host [command ...]` like `ssh` does.

`dial()` is shared with the proxy: it opens an asyncssh connection from the right
source address, accepts only the host keys management published for that peer, and
answers the server's password prompt with a fresh per-peer SSH token (fetched while the
key exchange runs). A token from the cache that the peer refuses is replaced once by a
new one in the same connection. Whatever the peer says while refusing (auth banners,
disconnect reasons) is shown as is, because that is where it names the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from meshsshd.acl import SOURCE_REFUSED

from .errors import AccessDenied, ClientError, HostKeyMismatch, NotLoggedIn
from .forwards import PeerNotes, setup_forwards
from .options import SSHArgs, env_to_send, want_pty
from .target import Target, choose_source_address, resolve, source_hint
from .terminal import RawTerminal, local_term_modes

if TYPE_CHECKING:
    import asyncssh

    from .auth import ExchangeResult, Session

def host_key_warning(target: Target, offered: Any, trusted: list[Any]) -> str:
    got = offered.get_fingerprint() if offered is not None else "an unknown key"
    alg = offered.get_algorithm() if offered is not None else ""
    want = ", ".join(k.get_fingerprint() for k in trusted) or "no key at all"
    bar = "@" * 59
    return (
        f"{bar}\n@    WARNING: PEER HOST KEY DOES NOT MATCH THE MESH'S!    @\n{bar}\n"
        f"{target.name} ({target.address} port {target.port}) presented {alg} {got},\n"
        f"but management publishes {want} for this peer.\n"
        "Someone may be intercepting this connection, or the peer's key changed without\n"
        "management knowing. Refusing to connect (meshssh never trusts a key on first use)."
    )


@functools.lru_cache(maxsize=1)
def _client_class() -> type:
    """Built on first use so that importing this module does not import asyncssh."""
    import asyncssh

    class MeshClient(asyncssh.SSHClient):
        """Token as password, banners to stderr, the offered host key recorded."""

        def __init__(self, ctx: DialContext) -> None:
            self.ctx = ctx

        def auth_banner_received(self, msg: str, lang: str) -> None:
            self.ctx.banner(msg)

        def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
            self.ctx.offered_key = key
            return False

        async def password_auth_requested(self) -> str | None:
            return await self.ctx.next_token()

        def auth_completed(self) -> None:
            self.ctx.authenticated = True

        def debug_msg_received(self, msg: str, lang: str, always_display: bool) -> None:
            self.ctx.notes.messages.append(msg)   # why a tcpip-forward failed (client/forwards.py)

        def connection_lost(self, exc: Exception | None) -> None:
            # After login, a peer that hangs up says why (e.g. access revoked by a policy
            # change); show it — the proxy's stderr is the only place OpenSSH users see it.
            reason = getattr(exc, "reason", "") if exc is not None else ""
            if self.ctx.authenticated and reason:
                self.ctx.show(f"{self.ctx.target.name}: {reason}")

    return MeshClient


@dataclass
class DialContext:
    target: Target
    session: Session | None
    quiet: bool = False
    say: Callable[[str], None] | None = None  # where messages go (default: our stderr)
    banners: list[str] = field(default_factory=list)
    offered_key: Any = None
    authenticated: bool = False
    token_error: ClientError | None = None
    used: ExchangeResult | None = None
    attempts: int = 0
    prefetch: asyncio.Task | None = None
    held: list[str] = field(default_factory=list)
    own_prefetch: bool = True
    notes: PeerNotes = field(default_factory=PeerNotes)

    def banner(self, msg: str) -> None:
        """Show what the peer says — except its refusal of a *cached* token, which we
        replace with a fresh one at once; that text is shown only if the retry fails too."""
        self.banners.append(msg.strip())
        if self.used is not None and self.used.cached and self.attempts == 1:
            self.held.append(msg)
        else:
            self.show(msg)

    def show(self, msg: str) -> None:
        if self.quiet:
            return
        if self.say is not None:
            self.say(msg)
            return
        sys.stderr.write(msg if msg.endswith("\n") else msg + "\n")
        sys.stderr.flush()

    def show_held(self) -> None:
        for msg in self.held:
            self.show(msg)
        self.held.clear()

    def start_prefetch(self) -> None:
        if self.session is not None:
            self.prefetch = asyncio.ensure_future(asyncio.to_thread(
                self.session.ssh_token, self.target.peer.id, self.target.name))

    async def next_token(self) -> str | None:
        if self.session is None:
            return None
        self.attempts += 1
        try:
            if self.attempts == 1 and self.prefetch is not None:
                res = await self.prefetch
            elif self.attempts == 2 and self.used is not None and self.used.cached:
                # A cached token the peer refused (expired, replayed): one fresh try.
                self.held.clear()
                res = await asyncio.to_thread(self.session.ssh_token, self.target.peer.id,
                                              self.target.name, True)
            else:
                return None
        except ClientError as exc:
            self.token_error = exc
            return None
        self.used = res
        return res.token

    async def cancel(self) -> None:
        if (self.own_prefetch and self.prefetch is not None and not self.prefetch.done()
                and self.attempts == 0):
            self.prefetch.cancel()
            with contextlib.suppress(BaseException):
                await self.prefetch


async def dial(target: Target, session: Session | None, *, source: str | None = None,
               quiet: bool = False, client_keys: Any = None, agent_path: Any = (),
               agent_forwarding: bool = False, keepalive: float = 0.0,
               connect_timeout: float = 30.0, trusted_keys: list[Any] | None = None,
               prefetch: asyncio.Future | None = None, say: Callable[[str], None] | None = None,
               **extra: Any) -> asyncssh.SSHClientConnection:
    """Connect and authenticate; raise a ClientError that says what went wrong.

    prefetch: a token request already under way (the proxy starts it before it knows
    the login name); otherwise one is started here, alongside the key exchange.
    """
    import asyncssh

    from .peers import host_keys

    keys = trusted_keys if trusted_keys is not None else host_keys(target.peer)
    if not keys:
        raise HostKeyMismatch(
            f"management publishes no SSH host key for {target.name}; refusing to connect "
            "without one (no trust on first use)")
    ctx = DialContext(target, session, quiet=quiet, say=say)
    if prefetch is not None:
        ctx.prefetch, ctx.own_prefetch = prefetch, False  # the caller's: never cancel it
    else:
        ctx.start_prefetch()
    kwargs: dict[str, Any] = dict(
        username=target.username, known_hosts=(keys, [], []), config=None,
        client_factory=lambda: _client_class()(ctx), preferred_auth="publickey,password",
        encoding=None, agent_forwarding=agent_forwarding, keepalive_interval=keepalive,
        connect_timeout=connect_timeout, client_keys=client_keys,
        login_timeout=connect_timeout, **extra,
    )
    if agent_path != ():
        kwargs["agent_path"] = agent_path
    if source:
        kwargs["local_addr"] = (source, 0)
    try:
        conn = await asyncssh.connect(target.address, target.port, **kwargs)
    except asyncssh.HostKeyNotVerifiable as exc:
        await ctx.cancel()
        raise HostKeyMismatch(host_key_warning(target, ctx.offered_key, keys)) from exc
    except asyncssh.PermissionDenied as exc:
        await ctx.cancel()
        ctx.show_held()
        if ctx.used is not None and session is not None:
            # The peer checked it (and keeps its jti) before refusing for another reason:
            # sent again from the cache it would only come back as a "replayed" alarm.
            await asyncio.to_thread(session.consume, target.peer.id, ctx.used.token)
        if ctx.token_error is not None:
            raise ctx.token_error from exc
        if ctx.banners and ctx.quiet:   # nobody saw the peer's reason (fan-out): carry it
            hint = f": {ctx.banners[-1]}"
        else:
            hint = "" if ctx.banners else f" ({exc.reason})"
        if any(SOURCE_REFUSED in b for b in ctx.banners):   # the source is the reason: say so
            hint += "; " + source_hint(source, session.login.management_url if session else "")
        raise AccessDenied(f"{target.username}@{target.name}: permission denied{hint}") from exc
    except asyncssh.DisconnectError as exc:
        await ctx.cancel()
        raise ClientError(f"{target.name}: disconnected: {exc.reason}") from exc
    except (OSError, asyncio.TimeoutError) as exc:
        await ctx.cancel()
        if isinstance(exc, asyncio.TimeoutError):
            what = "Connection timed out"
        elif getattr(exc, "errno", None):
            what = os.strerror(exc.errno)
        else:
            what = str(exc)
        raise ClientError(f"connect to host {target.name} ({target.address}) port "
                          f"{target.port}: {what}") from exc
    await ctx.cancel()
    # The control master reuses a connection only while the token it logged in with lives.
    conn.set_extra_info(meshssh_token_exp=ctx.used.exp if ctx.used is not None else None)
    if ctx.used is not None and session is not None:
        used = ctx.used
        await asyncio.to_thread(session.consume, target.peer.id, used.token)
    return conn


async def dial_verified(target: Target, session: Session, **kw: Any) -> asyncssh.SSHClientConnection:
    """dial(), but on a host-key mismatch refetch the peer list once (a key may have
    rotated since the list was cached) before refusing."""
    from .peers import PeerDirectory, match_peer

    try:
        return await dial(target, session, **kw)
    except HostKeyMismatch:
        fresh = await asyncio.to_thread(PeerDirectory(session).peers, True)
        peer = match_peer(fresh, target.peer.id)
        if peer is None or peer.ssh_host_keys == target.peer.ssh_host_keys:
            raise
        target.peer = peer
        return await dial(target, session, **kw)


# ---------------------------------------------------------------- interactive run

def _is_devnull(fd: int) -> bool:
    """stdin is /dev/null (`< /dev/null`, cron): epoll cannot watch it, so asyncssh would
    never read its end of file and the remote command would wait for input forever."""
    try:
        st, null = os.fstat(fd), os.stat(os.devnull)
    except OSError:
        return False
    return (st.st_mode, st.st_rdev) == (null.st_mode, null.st_rdev)


def _restore_blocking() -> None:
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.set_blocking(fd, True)


@dataclass
class Stdio:
    """Where a session's bytes and messages go: this process's own descriptors, or the
    ones a `meshssh` front passed to the control master (client/mux_master.py), which
    also hands over the front's environment. `own_terminal`: raw mode and SIGWINCH are
    handled here; the master leaves them to the front and gets resizes as messages,
    calling `resize_hook`."""

    stdin: int = 0
    stdout: int = 1
    stderr: int = 2
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    own_terminal: bool = True
    resize_hook: Callable[[], None] | None = None

    def say(self, text: str) -> None:
        data = (text if text.endswith("\n") else text + "\n").encode(errors="replace")
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self.stderr, data):]


async def resolve_for(args: SSHArgs, session: Any) -> Target:
    """The peer `args` names: through a delegated session's broker, or the peer list."""
    resolver = getattr(session, "resolve_target", None)  # a delegated session (client/broker_client.py)
    if resolver is not None:
        return await asyncio.to_thread(resolver, args.destination, args.port, args.user)
    return await asyncio.to_thread(resolve, args.destination, session, args.port, args.user)


async def dial_for(args: SSHArgs, session: Any, target: Target, io: Stdio) -> asyncssh.SSHClientConnection:
    """dial() with what `args` asks for: source address, keepalive, timeout, agent."""
    source = choose_source_address(args.bind_address, session.login.management_url, io.environ,
                                   exclude=target.address)
    keepalive = float(args.option("serveraliveinterval") or 0)
    connect_timeout = float(args.option("connecttimeout") or 30)
    client_keys: Any = list(args.identities) if args.identities else ()
    from .broker import agent_to_forward

    broker, forward = await agent_to_forward(args, session, target)
    delegated = getattr(session, "resolve_target", None) is not None
    try:
        conn = await (dial if delegated else dial_verified)(
            target, session, source=source, quiet=args.quiet, client_keys=client_keys,
            agent_path=(), agent_forwarding=forward, keepalive=keepalive,
            connect_timeout=connect_timeout, say=io.say,
        )
    except BaseException:
        if broker is not None:
            await broker.close()
        raise
    if broker is not None:
        broker.close_with(conn)
    return conn


async def run_session(args: SSHArgs, session: Session) -> int:
    """The `meshssh host [command]` body in this process; returns the exit code."""
    io = Stdio()
    target = await resolve_for(args, session)
    conn = await dial_for(args, session, target, io)
    async with conn:
        problems = await setup_forwards(conn, args, io.say)
        for p in problems:
            sys.stderr.write(p + "\n")
        if problems and (args.option("exitonforwardfailure") or "").lower() == "yes":
            return 255
        if args.no_command:
            await conn.wait_closed()
            return 0
        return await run_command(conn, target, args, io)


async def run_command(conn: Any, target: Target, args: SSHArgs, io: Stdio) -> int:
    """Open the session channel for `args` on `conn` and run it to the end."""
    import asyncssh

    try:
        process, pty = await open_process(conn, args, io)
    except asyncssh.ChannelOpenError as exc:
        io.say(f"{target.name}: session refused: {exc.reason}")
        return 255
    return await finish_process(process, pty, target, args, io)


async def open_process(conn: Any, args: SSHArgs, io: Stdio) -> tuple[Any, bool]:
    """The remote process, its channel open and its requests answered; (process, pty).
    Raises asyncssh.ChannelOpenError when the peer refuses the session."""
    stdin_tty = os.isatty(io.stdin)
    pty = want_pty(args, stdin_tty)
    if args.tty == 1 and not stdin_tty and not args.quiet:
        io.say("Pseudo-terminal will not be allocated because stdin is not a terminal.")
    env = env_to_send(args.send_env, dict(io.environ))
    env.update(dict(args.set_env))
    kw: dict[str, Any] = dict(env=env, encoding=None)
    if pty:
        size = os.get_terminal_size(io.stdin) if stdin_tty else os.terminal_size((80, 24))
        kw.update(term_type=io.environ.get("TERM", "xterm"), term_size=(size.columns, size.lines),
                  term_modes=local_term_modes(io.stdin) if stdin_tty else {}, request_pty="force")
    else:
        kw.update(request_pty=False)
    if args.subsystem:
        process = await conn.create_process(subsystem=args.remote_command, **kw)
    else:
        process = await conn.create_process(args.remote_command, **kw)
    return process, pty


async def finish_process(process: Any, pty: bool, target: Target, args: SSHArgs, io: Stdio) -> int:
    """Relay the process's streams to `io` until it ends; its exit code as ssh gives it."""
    import asyncssh

    stdin_tty = os.isatty(io.stdin)
    try:
        stdin: Any = asyncssh.DEVNULL if args.stdin_null or _is_devnull(io.stdin) else os.dup(io.stdin)
    except OSError:  # started with stdin closed (cron, some daemons)
        stdin = asyncssh.DEVNULL
    loop = asyncio.get_running_loop()
    local_tty = pty and stdin_tty
    raw = RawTerminal(io.stdin) if local_tty and io.own_terminal else contextlib.nullcontext()
    with raw:
        if local_tty:
            def winch() -> None:
                with contextlib.suppress(OSError, asyncssh.Error):
                    sz = os.get_terminal_size(io.stdin)
                    process.change_terminal_size(sz.columns, sz.lines)
            io.resize_hook = winch
            if io.own_terminal:
                loop.add_signal_handler(signal.SIGWINCH, winch)
        try:
            await process.redirect(stdin=stdin, stdout=os.dup(io.stdout), stderr=os.dup(io.stderr))
            await process.wait_closed()
        finally:
            io.resize_hook = None
            if local_tty and io.own_terminal:
                loop.remove_signal_handler(signal.SIGWINCH)
    if process.exit_signal is not None:
        sig = process.exit_signal[0]
        if args.verbose:
            io.say(f"remote command was killed by signal {sig}")
        return 255
    if process.exit_status is None:
        if not args.quiet:
            io.say(f"Connection to {target.name} closed by remote host.")
        return 255
    if pty and not args.quiet and args.remote_command is None and stdin_tty:
        io.say(f"Connection to {target.name} closed.\r")
    return process.exit_status


def main_connect(args: SSHArgs) -> int:
    """Entry from the CLI: build the session, run, translate errors to exit 255."""
    import logging

    from .auth import Session, parse_ttl

    level = logging.DEBUG if args.verbose >= 2 else logging.INFO if args.verbose else logging.CRITICAL
    logging.basicConfig(level=level, stream=sys.stderr, format="debug: %(name)s: %(message)s")
    if args.verbose < 3:
        logging.getLogger("asyncssh").setLevel(max(level, logging.INFO if args.verbose else logging.CRITICAL))
    if not args.quiet:
        for warning in args.warnings:
            sys.stderr.write(f"meshssh: {warning}\n")
    ttl = parse_ttl(args.ssh_jwt_cache_ttl if args.ssh_jwt_cache_ttl is not None
                    else os.environ.get("MESHSSH_SSH_JWT_CACHE_TTL"))
    try:
        try:
            session: Any = Session(ttl=ttl, no_cache=args.no_cache)
        except NotLoggedIn:
            # No login here: a session whose agent is the token broker of the user's
            # client on another peer asks it instead (docs/delegation.md).
            from .broker_client import broker_session

            session = broker_session()
            if session is None:
                raise
        return asyncio.run(run_session(args, session))
    except ClientError as exc:
        sys.stderr.write(f"meshssh: {exc}\n")
        return exc.exit_code
    finally:
        _restore_blocking()
