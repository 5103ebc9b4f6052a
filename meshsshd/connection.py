"""One client connection of the embedded SSH server, from TCP accept to close.

`Connection` is asyncssh's per-connection `SSHServer`: its hooks parse, ask the pure
cores (`acl.evaluate`, `account.decide`, `limits`, `forwarding.may_listen`,
`permit_open`) and apply the answer. It reads the server's state of the moment
(`ServerState`, which `MeshSSHServer` in `server.py` is: settings, validator, limits,
audit sink) and never changes settings itself.

Authentication paths, all ending in the same access-rule check:
- JWT as the SSH password (keyboard-interactive is bridged to it by asyncssh);
- public keys from the target user's authorized_keys (`authorized_keys = true`);
- "none" with `disable_auth` (identity `peer:<source ip>`).
A refusal is one log line (reason code, never the token), an audit event, and a short
message to the client through the userauth banner. A refused forward is one
`forward.refused` line within a per-source budget, and the client is told the setting
that would allow it (`remedies.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from . import account, acl, asyncssh_keyopts, forwarding, handshake
from .audit import AuditSink, ForwardClosed, ForwardOpened, SessionRevoked
from .audit import AuthRefused as AuthRefusedEvent
from .auth import Identity, JWTValidator, key_identity, peer_identity
from .config import ServerSettings
from .detached import DetachableSession, DetachedSessions
from .errors import AuthRefused
from .idle import IdleWatch
from .limits import FD_RESERVE, AuthTries, Penalties, StartupGate, fds_free
from .log_budget import LogBudget
from .logs import event
from .remedies import with_remedy
from .session import ChildSession, ConnectionInfo, SessionContext, resolve_subsystem
from .users import LocalUser, lookup_user_sync


# The logger of the whole SSH server: log lines name it, and metrics.py counts logins there.
log = logging.getLogger("meshsshd.server")


def jwt_enabled(settings: ServerSettings) -> bool:
    return not settings.disable_auth and settings.jwt.configured


def still_allowed(settings: ServerSettings, identity: Identity, login: str, source_ip: str) -> tuple[str, str]:
    """("", "") when a login may go on under new settings, else (reason, message for the
    user). The one re-check for live connections and detached sessions alike."""
    method_on = {"jwt": jwt_enabled(settings), "publickey": settings.authorized_keys,
                 "none": settings.disable_auth}.get(identity.method, False)
    if not method_on:
        return "method", f"{identity.method} logins were turned off on this peer"
    result = acl.evaluate(settings.access, source_ip, identity, login, root_login=settings.root_login)
    if not result.allowed:
        return result.reason, f"access revoked: {result.message}"
    return "", ""


def open_policy(settings: ServerSettings) -> forwarding.OpenPolicy:
    return forwarding.OpenPolicy(settings.permit_open, settings.forward_protected)


async def _load_authorized_keys(user: LocalUser) -> asyncssh.SSHAuthorizedKeys | None:
    """S2's StrictModes-checking loader (imported late: it is optional for JWT-only peers)."""
    from .authorized_keys import load_authorized_keys

    if user.passwd is None:
        return None
    return await load_authorized_keys(user.passwd)


def _resolve_user(name: str, nologin_files: tuple[Path, ...]) -> tuple[LocalUser | None, account.AccountState | None]:
    """Blocking (executor): the local user and their account state, in one job."""
    user = lookup_user_sync(name)
    return user, (account.read_account_sync(user, nologin_files) if user is not None else None)



class ServerState(Protocol):
    """What a connection reads of its server (`MeshSSHServer` is one): the settings and
    validator of the moment, the shared limits and registries, the audit sink. A
    protocol, so this module needs nothing from server.py, which imports it."""

    settings: ServerSettings
    validator: JWTValidator | None
    audit: AuditSink
    gate: StartupGate
    penalties: Penalties
    connections: set[Connection]
    session_registry: dict[str, dict[str, Any]]
    cgroup_scope: Any
    detached: DetachedSessions
    stats: dict[str, int]
    forward_log: LogBudget

    def open_sessions(self, identity: str) -> int: ...

class Connection(asyncssh.SSHServer):
    """One client connection, from TCP accept to close."""

    def __init__(self, server: ServerState) -> None:
        self.server = server
        self.conn: asyncssh.SSHServerConnection | None = None
        self.info = ConnectionInfo("", 0, "", 0)
        self.login = ""
        self.user: LocalUser | None = None
        self.identity: Identity | None = None
        self.ctx: SessionContext | None = None
        self.sessions: set[ChildSession] = set()
        self.opened = time.time()
        self._unused: IdleWatch | None = None   # unused_connection_timeout, after login
        self._tries = AuthTries(server.settings.limits.max_auth_tries)
        self._authorized_keys: asyncssh.SSHAuthorizedKeys | None = None
        self._key_options: dict[str, Any] | None = None
        self._accept_env: tuple[str, ...] = ()   # of the rule that admitted the login
        self._account: account.AccountState | None = None
        self._admitted = False
        self._closing = False
        self.local_forwards = forwarding.LocalForwards()
        self.remote_listeners = forwarding.RemoteListeners()
        # Set by revoke(): the message new channels are refused with until the
        # connection's delayed disconnect lands.
        self.revoked: str | None = None

    # ---- connection -----------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        local = conn.get_extra_info("sockname") or ("", 0)
        self.info = ConnectionInfo(str(peer[0]), int(peer[1]), str(local[0]), int(local[1]))
        srv = self.server
        free = fds_free()
        if free < FD_RESERVE:
            event(log, "connection.refused", level=logging.WARNING, source=self.info.client_ip, reason="fds-low",
                  fds_free=free)
            self._drop()
            return
        blocked = srv.penalties.blocked_for(self.info.client_ip)
        if blocked > 0:
            event(log, "connection.refused", source=self.info.client_ip, reason="penalty", seconds=round(blocked))
            self._drop()
            return
        admission = srv.gate.admit(self, self.info.client_ip)
        if not admission.admitted:
            event(log, "connection.dropped", level=logging.DEBUG, source=self.info.client_ip, reason=admission.reason,
                  unauthenticated=srv.gate.unauthenticated)
            srv.stats["dropped"] += 1
            self._drop()
            return
        if admission.evict is not None:
            srv.stats["evicted"] += 1
            victim = admission.evict
            assert isinstance(victim, Connection)
            event(log, "connection.evicted", level=logging.DEBUG, source=victim.info.client_ip,
                  reason=admission.reason, by=self.info.client_ip)
            victim._drop()
        self._admitted = True
        srv.connections.add(self)

    def _drop(self) -> None:
        """Close without ceremony (flood or penalty): the client has sent nothing yet."""
        self._closing = True
        conn = self.conn
        if conn is not None:
            asyncio.get_running_loop().call_soon(conn.abort)

    def _close_unused(self) -> None:
        seconds = self.server.settings.unused_connection_timeout
        event(log, "connection.unused_closed", source=self.info.client_ip, user=self.login, seconds=seconds)
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"no open channel for {seconds:g} s")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._unused is not None:
            self._unused.stop()
        if self._admitted and self.conn is not None:   # flood drops have their own event
            handshake.log_failure(self.conn, exc, self.info.client_ip)
        self.server.gate.done(self)
        self.server.connections.discard(self)
        if self.ctx is not None:
            self.ctx.agent.close()

    # ---- authentication -------------------------------------------------------------
    async def begin_auth(self, username: str) -> bool:
        srv = self.server
        srv.gate.progressed(self)
        self.login = username
        self.identity = None
        self._authorized_keys = None
        settings = srv.settings
        if settings.banner and self.conn is not None:
            self.conn.send_auth_banner(settings.banner)
        self.user, self._account = await asyncio.get_running_loop().run_in_executor(
            None, _resolve_user, username, settings.nologin_files)
        if self.user is not None and settings.authorized_keys and not self._closing:
            try:
                self._authorized_keys = await _load_authorized_keys(self.user)
            except Exception as exc:  # a broken loader must not crash the connection
                event(log, "authorized-keys.failed", level=logging.WARNING, user=username, error=str(exc))
        if settings.disable_auth:
            identity = peer_identity(self.info.client_ip)
            if self._check_access(identity):
                self.identity = identity
                return False   # "none" succeeds
        return True

    def password_auth_supported(self) -> bool:
        return jwt_enabled(self.server.settings) and self.server.validator is not None

    async def validate_password(self, username: str, password: str) -> bool:
        self.server.gate.progressed(self)
        self._key_options = None  # each attempt on its own: no options of a key queried before
        validator = self.server.validator
        if validator is None:
            return False
        try:
            identity = await validator.validate(password)
        except AuthRefused as exc:
            self._refuse(exc.reason, exc.user_message, method="jwt")
            return False
        return self._check_access(identity)

    def public_key_auth_supported(self) -> bool:
        return self.server.settings.authorized_keys

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Each attempt on its own: a key only offered (a query, no signature) or refused
        # earlier must not lend its options to the method that finally succeeds.
        self._key_options = None
        self.server.gate.progressed(self)
        keys = self._authorized_keys
        options = keys.validate(key, self.info.client_ip, self.info.client_ip) if keys else None
        if options is None:
            self._refuse("unknown-key", "public key not accepted", method="publickey", quiet=True)
            return False
        if options and not asyncssh_keyopts.enforceable():
            self._refuse("key-options-unsupported", "this key's authorized_keys options cannot be "
                         "enforced by this server — ask the administrator", method="publickey")
            return False
        if self._check_access(key_identity(key.get_fingerprint("sha256"))):
            self._key_options = dict(options)
            return True
        return False

    def _check_access(self, identity: Identity) -> bool:
        """The access rules for this login; on success remember the identity."""
        settings = self.server.settings
        if self.user is None:
            self._refuse("local-user", f"you may not log in as {self.login} on this peer",
                         method=identity.method, identity=identity.value, via=identity.via)
            return False
        login = "root" if self.user.is_root else self.login
        result = acl.evaluate(settings.access, self.info.client_ip, identity, login, root_login=settings.root_login)
        if not result.allowed:
            self._refuse(result.reason, result.message, method=identity.method, identity=identity.value,
                         via=identity.via)
            return False
        if not self._account_allows(identity):
            return False
        rule = settings.access[result.rule_index] if result.rule_index is not None else None
        self._accept_env = rule.accept_env if rule is not None and rule.accept_env is not None else settings.accept_env
        self.identity = identity
        return True

    def _account_allows(self, identity: Identity) -> bool:
        """Expiry and nologin (meshsshd/account.py), after the access rules so that only
        someone the rules admit learns about the account."""
        assert self.user is not None
        state = self._account or account.AccountState(error="account state was not read")
        decision = account.decide(state, is_root=self.user.is_root, today=int(time.time() // account.DAY))
        if decision.allowed:
            return True
        if state.error is not None:
            event(log, "account.unreadable", level=logging.WARNING, user=self.user.name, error=state.error)
        self._refuse(decision.reason, decision.message, method=identity.method, identity=identity.value,
                     via=identity.via)
        return False

    def _refuse(self, reason: str, message: str, *, method: str, identity: str = "", quiet: bool = False,
                via: str | None = None) -> None:
        """via: the peer a delegated token came through (docs/delegation.md), kept in the
        refusal too, so a refused second hop shows the whole chain."""
        srv = self.server
        event(log, "auth.refused", level=logging.INFO, reason=reason, method=method, user=self.login,
              source=self.info.client_ip, identity=identity or None, via=via)
        srv.audit.emit(AuthRefusedEvent(identity=identity, source_ip=self.info.client_ip,
                                        local_user=self.login, reason=reason, via=via))
        conn = self.conn
        if conn is None:
            return
        if not quiet:
            try:
                conn.send_auth_banner(f"meshsshd: {message}\r\n")
            except Exception:  # banner is best effort (only allowed before auth completes)
                pass
        if srv.penalties.record_failure(self.info.client_ip):
            event(log, "source.penalized", source=self.info.client_ip,
                  seconds=srv.settings.limits.penalty_seconds)
        if self._tries.fail():
            event(log, "auth.too-many-tries", source=self.info.client_ip, user=self.login)
            self._closing = True
            asyncio.get_running_loop().call_soon(
                conn.disconnect, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                "too many authentication failures")

    async def auth_completed(self) -> None:
        srv = self.server
        srv.gate.done(self)
        assert self.user is not None and self.identity is not None and self.conn is not None
        options = dict(self._key_options or {})
        # The session applies a forced command itself (asyncssh would drop the original
        # command, which SSH_ORIGINAL_COMMAND must carry).
        forced = options.pop("command", None)
        if srv.settings.force_command is not None:   # sshd: ForceCommand wins over command=
            forced = srv.settings.force_command
        if self._key_options:
            # asyncssh resets key options when our validate_public_key accepted the key;
            # restore them so from=, no-pty, permitopen... keep working.
            asyncssh_keyopts.restore(self.conn, options)
        # Forced-command and `restrict` keys exist to pin down what runs: no client
        # variables at all, so none can steer the command (LANG, LC_* included).
        restricted = forced is not None or bool(options.get("restrict"))
        self.ctx = SessionContext(
            user=self.user, conn=self.info, identity=self.identity.value, via=self.identity.via,
            audit=srv.audit, resolve_subsystem=lambda name: resolve_subsystem(srv.settings, name),
            accept_env=() if restricted else self._accept_env,
            registry=srv.session_registry, forced_command=None if forced is None else str(forced),
            method=self.identity.method,
            token_local_users=self.identity.local_users,
            cgroup_scope=srv.cgroup_scope,
            channel_timeout=srv.settings.channel_timeout,
        )
        if srv.settings.unused_connection_timeout and self.conn is not None:
            conn = self.conn
            self._unused = IdleWatch(srv.settings.unused_connection_timeout, self._close_unused,
                                     busy=lambda: bool(getattr(conn, "_channels", None)))
        event(log, "auth.accepted", method=self.identity.method, identity=self.identity.value,
              user=self.user.name, source=self.info.client_ip)

    # ---- channels -------------------------------------------------------------------
    def _refuse_if_revoked(self) -> None:
        """A revoked connection stays open for a moment so the user reads why; a pooled
        client (meshssh's control master) must not open new channels in that moment."""
        if self.revoked is not None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, self.revoked)

    def session_requested(self) -> Any:
        if self.ctx is None:
            return False
        self._refuse_if_revoked()
        live = {s for s in self.sessions if not s.closed}
        self.sessions = live
        limits = self.server.settings.limits
        if len(live) >= limits.max_sessions:
            event(log, "session.refused", reason="max-sessions", source=self.info.client_ip)
            return False
        if self.server.open_sessions(self.ctx.identity) >= limits.max_sessions_per_identity:
            event(log, "session.refused", reason="max-sessions-per-identity", identity=self.ctx.identity,
                  source=self.info.client_ip)
            return False
        session = DetachableSession(self.ctx, self.server.detached)
        self.sessions.add(session)
        assert self.conn is not None
        return self.remote_listeners.answered_first(self.conn, session)   # -R replies go first

    def _forward_refused(self, kind: str, reason: str, setting: str = "", **fields: Any) -> str:
        """One `forward.refused` line (within the source's log budget: a client may ask as
        fast as it sends) and the text the client is told, naming the fix."""
        srv = self.server
        held = srv.forward_log.take(self.info.client_ip)
        if held is not None:
            if setting:
                fields["setting"] = setting
            if held:
                fields["suppressed"] = held   # lines held back since the last one
            event(log, "forward.refused", kind=kind, reason=reason, source=self.info.client_ip,
                  identity=self.ctx.identity if self.ctx else None, **fields)
        return with_remedy(reason, setting, managed=srv.settings.managed)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        settings = self.server.settings
        self._refuse_if_revoked()
        if self.ctx is None or not settings.local_port_forwarding:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, self._forward_refused(
                "local", "local port forwarding is disabled on this peer", "local_port_forwarding",
                host=dest_host, port=dest_port))
        conn, ctx = self.conn, self.ctx
        assert conn is not None

        def refused(reason: str) -> str:
            return self._forward_refused("local", reason, "permit_open", host=dest_host, port=dest_port)

        async def open_() -> Any:
            forwarder = await forwarding.open_local(
                conn, ctx.user, dest_host, dest_port, policy=lambda: open_policy(self.server.settings),
                timeout=settings.limits.dial_timeout, registry=self.local_forwards, on_refused=refused)
            self.server.audit.emit(ForwardOpened(**ctx.base_event(""), forward=f"local {dest_host}:{dest_port}"))
            return forwarder
        return open_()

    def _refuse_listen(self, reason: str, setting: str = "", **fields: Any) -> bool:
        """A tcpip-forward failure carries no text in SSH: the reason goes to the client as
        a debug message just before the failure (`ssh -v` shows "Remote: ...", meshssh and
        its proxy print it with the failure)."""
        message = self._forward_refused("remote", reason, setting, **fields)
        if self.conn is not None:
            self.conn.send_debug(f"meshsshd: {message}")
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        settings = self.server.settings
        if self.revoked is not None:
            return self._refuse_listen(self.revoked, host=listen_host, port=listen_port)
        if self.ctx is None or not settings.remote_port_forwarding:
            return self._refuse_listen("remote port forwarding is disabled on this peer", "remote_port_forwarding",
                                       host=listen_host, port=listen_port)
        decision = forwarding.may_listen(listen_host, listen_port, uid=self.ctx.user.uid,
                                         own_addresses=settings.own_addresses, permit_listen=settings.permit_listen)
        if not decision.allowed:
            return self._refuse_listen(decision.reason, decision.setting, host=listen_host, port=listen_port)
        ctx, conn = self.ctx, self.conn
        assert conn is not None

        async def listen() -> Any:
            try:
                return await self.remote_listeners.listen(   # forward.opened once the port is bound
                    conn, ctx.user, listen_host, listen_port, settings.own_addresses,
                    lambda: self.server.audit.emit(ForwardOpened(**ctx.base_event(""),
                                                                 forward=f"remote {listen_host}:{listen_port}")))
            except OSError as exc:   # port in use, an address not here: sshd logs it too
                why = exc.strerror or str(exc).rsplit(": ", 1)[-1]   # the helper's text ends in the errno's
                return self._refuse_listen(f"cannot listen on {listen_host} port {listen_port}: {why}",
                                           host=listen_host, port=listen_port)
        return listen()

    def recheck_forwards(self, settings: ServerSettings) -> None:
        """Close the forwards the new settings would not open (flags, permit_open, -R binds)."""
        if self.ctx is None:
            return
        closed = self.local_forwards.recheck(settings.local_port_forwarding, open_policy(settings))
        closed += self.remote_listeners.recheck(settings.remote_port_forwarding, self.ctx.user.uid,
                                                settings.own_addresses, settings.permit_listen)
        for forward, reason in closed:
            self.server.audit.emit(ForwardClosed(**self.ctx.base_event(""), forward=forward, reason=reason))
            event(log, "forward.closed", forward=forward, reason=reason, identity=self.ctx.identity,
                  source=self.info.client_ip)

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False

    # ---- revocation -----------------------------------------------------------------
    def revoke(self, reason: str, message: str) -> None:
        """Close every session and the connection, telling the user why."""
        srv = self.server
        assert self.ctx is not None
        self.revoked = message
        srv.audit.emit(SessionRevoked(**self.ctx.base_event(""), reason=reason))
        event(log, "session.revoked", reason=reason, identity=self.ctx.identity, user=self.ctx.user.name,
              source=self.info.client_ip)
        for session in list(self.sessions):
            session.close(message)
        if self.conn is not None:
            conn = self.conn
            asyncio.get_running_loop().call_later(
                0.2, conn.disconnect, asyncssh.DISC_BY_APPLICATION, f"meshsshd: {message}")


def handshake_stage(connection: Hashable) -> int:
    """How far a pre-auth connection got: 0 silent, 1 sent its identification string,
    2 finished key exchange (asyncssh records the ciphers at NEWKEYS)."""
    assert isinstance(connection, Connection)
    conn = connection.conn
    if conn is None or not conn.get_extra_info("client_version"):
        return 0
    return 2 if conn.get_extra_info("recv_cipher") else 1
