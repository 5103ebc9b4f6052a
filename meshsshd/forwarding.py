"""Port forwarding policy and the local-forward dialer.

- direct-tcpip (`ssh -L`, `-D`): only when local forwarding is on, and only to what
  `permit_open` allows (`meshsshd/permit_open.py`: OpenSSH's PermitOpen, checked on every
  address the requested name resolves to; link-local and the management server refused
  unless listed). The connection is made as the user (`meshsshd/dialer.py`), to the checked
  address, with a timeout (30 s by default); the channel opens only once it stands, so a
  dead target gives the client a clean "connect failed".
- Every `apply()` re-checks what is open (`LocalForwards.recheck`, `RemoteListeners`): a
  forward the new settings would refuse is closed.
- tcpip-forward (`ssh -R`): only when remote forwarding is on, only on loopback or the
  peer's own addresses (asyncssh would otherwise bind every interface for `''`/`0.0.0.0`,
  i.e. GatewayPorts yes), never on a privileged port unless the user is root, and only
  where `permit_listen` allows (OpenSSH's PermitListen, which can only narrow this). The
  listening socket is made as the user (`dialer.listen_as_user`), like sshd's, which
  binds after its privilege drop: the kernel's port rules are the user's, and the socket
  is the user's (`ss -ltne` shows their uid). The daemon accepts on it and opens a
  forwarded-tcpip channel per connection, as asyncssh does for its own listeners.
  asyncssh closes the listener on cancel-tcpip-forward and when the connection ends; a
  bind that completes after the connection ended is closed by `RemoteListeners.listen`.
- Unix-socket forwarding is refused: the daemon would create or connect sockets as root.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh
from asyncssh.forward import SSHForwarder, SSHLocalPortForwarder
from asyncssh.listener import SSHForwardListener

from .dialer import LISTEN_TIMEOUT, DialError, dial_as_user, listen_as_user
from .permit_open import OpenDecision, may_listen_on, may_open
from .users import LocalUser

PRIVILEGED_PORTS_BELOW = 1024


@dataclass(frozen=True)
class ForwardDecision:
    allowed: bool
    reason: str = ""
    setting: str = ""   # the ServerSettings field that refused ("": the request itself is wrong)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_bindable(host: str, own_addresses: Sequence[str]) -> bool:
    return _is_loopback(host) or host in {a.lower() for a in own_addresses}


def may_listen(host: str, port: int, *, uid: int, own_addresses: Sequence[str],
               permit_listen: Sequence[str] = ()) -> ForwardDecision:
    """Whether a remote forward may bind host:port for a user with this uid."""
    host = host.strip().lower()
    if host in ("", "*", "0.0.0.0", "::", "[::]"):
        return ForwardDecision(False, "remote forwards may bind only loopback or this peer's mesh address")
    if not _is_bindable(host, own_addresses):
        return ForwardDecision(False, f"remote forwards may not bind {host}")
    if not 0 <= port <= 65535:
        return ForwardDecision(False, "port out of range")
    if 0 < port < PRIVILEGED_PORTS_BELOW and uid != 0:
        return ForwardDecision(False, f"port {port} is privileged; only root may forward it")
    permitted = may_listen_on(permit_listen, host, port)
    return ForwardDecision(permitted.allowed, permitted.reason, "" if permitted.allowed else "permit_listen")


async def _bind_as_user(conn: asyncssh.SSHServerConnection, user: LocalUser, host: str, port: int,
                        own_addresses: Sequence[str]) -> SSHForwardListener:
    """What asyncssh's `forward_local_port` builds, on sockets the user bound: each
    accepted connection becomes a forwarded-tcpip channel naming host and the bound port.
    Every address `host` stands for must itself be bindable (a name that resolves
    elsewhere is refused). Raises OSError, which asyncssh answers with a failure reply."""
    addresses = await _resolve(host, port)
    if not addresses or not all(_is_bindable(a, own_addresses) for a in addresses):
        raise DialError(f"{host} does not stand for loopback or this peer's own addresses only")
    socks = await listen_as_user(user, addresses, port)
    bound = socks[0].getsockname()[1]

    async def tunnel(session_factory: Any, orig_host: str, orig_port: int) -> Any:
        return await conn.create_connection(session_factory, host, bound, orig_host, orig_port)

    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    try:
        for sock in socks:
            servers.append(await loop.create_server(lambda: SSHLocalPortForwarder(conn, tunnel), sock=sock))
    except BaseException:
        for server in servers:
            server.close()
        for sock in socks:
            sock.close()
        raise
    return SSHForwardListener(conn, servers, (host, bound), bound)


class RemoteListeners:
    """The `ssh -R` listeners of one connection, kept so `apply()` can close them."""

    def __init__(self) -> None:
        self.open: dict[asyncssh.SSHListener, tuple[str, int]] = {}
        self._pending: set[asyncio.Future[None]] = set()

    def answered_first(self, conn: asyncssh.SSHServerConnection,
                       session: asyncssh.SSHServerSession) -> tuple[asyncssh.SSHServerChannel, Any]:
        """What `session_requested` returns so that the session opens only once the
        tcpip-forward requests the client sent before it are answered.

        sshd answers a request before it reads the next message; asyncssh answers
        tcpip-forward in a task while the session goes ahead, and a bind made by a helper
        process takes milliseconds: a quick command's output and exit status could reach
        the client before a refusal, and `ExitOnForwardFailure=yes` would miss it."""
        return conn.create_server_channel(), self._settled(session)

    async def _settled(self, session: asyncssh.SSHServerSession) -> asyncssh.SSHServerSession:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LISTEN_TIMEOUT + 5.0
        while loop.time() < deadline:
            # Requests received before the channel open reach `listen` in tasks queued
            # before this one; one queued behind an answered request right after it.
            await asyncio.sleep(0)
            if not self._pending:
                break
            await asyncio.wait(set(self._pending), timeout=max(0.0, deadline - loop.time()))
        return session

    async def listen(self, conn: asyncssh.SSHServerConnection, user: LocalUser, host: str, port: int,
                     own_addresses: Sequence[str], on_opened: Callable[[], None]) -> asyncssh.SSHListener | bool:
        """The listener for `server_requested()`, bound as `user` and kept; False when the
        client left meanwhile. `on_opened` runs only once the port is bound.

        asyncssh binds in a task and closes a connection's listeners when it ends, so a
        bind that completes after the client dropped would belong to nobody and keep the
        port until a restart: such a listener is closed at once. A failed bind raises
        OSError, which asyncssh answers with a failure reply."""
        answered = asyncio.get_running_loop().create_future()
        self._pending.add(answered)
        try:
            listener = await _bind_as_user(conn, user, host, port, own_addresses)
        finally:   # asyncssh sends the reply right after this returns, before waiters wake
            self._pending.discard(answered)
            answered.set_result(None)
        if conn.is_closed():
            listener.close()
            return False
        self.open[listener] = (host, port)
        on_opened()
        return listener

    def recheck(self, enabled: bool, uid: int, own_addresses: Sequence[str],
                permit_listen: Sequence[str] = ()) -> list[tuple[str, str]]:
        """Close what the new settings refuse: (forward, reason) for each."""
        closed = []
        for listener, (host, port) in list(self.open.items()):
            reason = ("remote port forwarding is disabled" if not enabled
                      else may_listen(host, port, uid=uid, own_addresses=own_addresses,
                                      permit_listen=permit_listen).reason)
            if reason:
                self.open.pop(listener, None)
                listener.close()
                closed.append((f"remote {host}:{port}", reason))
        return closed


@dataclass(frozen=True)
class OpenPolicy:
    """What `may_open` needs from the settings of the moment."""

    permit_open: tuple[str, ...]
    protected: tuple[str, ...]

    def decide(self, name: str, address: str, port: int) -> OpenDecision:
        return may_open(self.permit_open, name, address, port, protected=self.protected)


class _TrackedForwarder(SSHForwarder):
    """The channel side of one local forward; leaves its registry when it closes.

    The target socket is read from the moment it is wired up, before the channel is
    open: a target that talks first (a greeting, an SSH banner, a file and FIN) sends
    then. asyncssh's `forward_connection` pairs the two sides only after the socket is
    being read (what comes in between stays in a buffer nobody flushes) and its channel
    side drops writes while it has no channel. This side exists before the socket is
    wired (`wire`), keeps what arrives and the EOF until the channel opens, and stops
    reading the target after the first chunk so that the rest waits in the kernel's
    socket buffer. (Pausing in the target's `connection_made` would be simpler, but uvloop
    ignores a pause there.)"""

    def __init__(self, registry: LocalForwards, target: tuple[str, str, int]) -> None:
        super().__init__()
        self.target = target
        self._registry = registry
        self._early: list[bytes] = []
        self._early_eof = False
        self._held = False

    @classmethod
    async def wire(cls, sock: socket.socket, registry: LocalForwards, target: tuple[str, str, int]) -> _TrackedForwarder:
        """The channel side for a connected socket, paired before the socket is read."""
        forwarder = cls(registry, target)
        await asyncio.get_running_loop().create_connection(lambda: SSHForwarder(forwarder), sock=sock)
        registry.open[forwarder] = target
        return forwarder

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            super().write(data)
            return
        self._early.append(data)
        if not self._held and self._peer is not None:
            self._held = True
            self._peer.pause_reading()

    def write_eof(self) -> None:
        if self._transport is not None:
            super().write_eof()
        else:
            self._early_eof = True

    def eof_received(self) -> bool:
        """The client's EOF. When the target's came first, nothing else would end the
        forward (asyncssh closes only when the target's EOF comes last): close it here."""
        keep_open = super().eof_received()
        if not keep_open:
            self.close()
        return keep_open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The channel is open (asyncssh sent the confirmation): deliver what waited."""
        super().connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            super().write(data)
        if self._early_eof:
            super().write_eof()
        if self._held and self._peer is not None:
            self._held = False
            self._peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.open.pop(self, None)
        super().connection_lost(exc)


class LocalForwards:
    """The open direct-tcpip forwards of one connection: (name, address, port) each."""

    def __init__(self) -> None:
        self.open: dict[_TrackedForwarder, tuple[str, str, int]] = {}

    def recheck(self, enabled: bool, policy: OpenPolicy) -> list[tuple[str, str]]:
        """Close what the new settings refuse: (forward, reason) for each."""
        closed = []
        for forwarder, (name, address, port) in list(self.open.items()):
            reason = "local port forwarding is disabled" if not enabled else policy.decide(name, address, port).reason
            if reason:
                self.open.pop(forwarder, None)
                forwarder.close()
                closed.append((f"local {name}:{port}", reason))
        return closed


async def _resolve(host: str, port: int) -> list[str]:
    """The addresses `host` stands for, in the resolver's order (no duplicates); DialError."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DialError(f"cannot resolve {host}: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def open_local(conn: asyncssh.SSHServerConnection, user: LocalUser, host: str, port: int, *,
                     policy: Callable[[], OpenPolicy], timeout: float, registry: LocalForwards,
                     on_refused: Callable[[str], str]) -> SSHForwarder:
    """Resolve, check each address against the policy, dial the first allowed one that
    answers as the user, and give asyncssh the connected socket; or refuse the channel.
    `on_refused` gets a permit_open refusal's reason (to log) and gives back what the
    client is told."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        addresses = await asyncio.wait_for(_resolve(host, port), timeout)
    except asyncio.TimeoutError:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, f"resolving {host} timed out") from None
    except DialError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
    current = policy()
    allowed, refusal = [], ""
    for address in addresses:
        decision = current.decide(host, address, port)
        if decision.allowed:
            allowed.append(address)
        else:
            refusal = refusal or decision.reason
    if not allowed:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, on_refused(refusal))
    error = ""
    for address in allowed:
        try:
            sock = await dial_as_user(user, address, port, max(0.5, deadline - loop.time()))
        except (DialError, OSError) as exc:
            error = str(exc)
            continue
        if not policy().decide(host, address, port).allowed:   # an apply() landed meanwhile
            sock.close()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            f"{host} port {port} is no longer allowed")
        return await _TrackedForwarder.wire(sock, registry, (host, address, port))
    raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, error or f"cannot connect to {host} port {port}")
