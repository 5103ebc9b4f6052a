"""The SSH listener: authentication, limits and dispatch of sessions and forwards.

`MeshSSHServer` owns the listening sockets, host keys, the JWT validator and the live
connections; it only ever sees a `ServerSettings` (standalone `meshsshd serve` builds it
from TOML, managed `meshsshd up` from the network map) and `apply()` swaps it whole.
`_Connection` is asyncssh's per-connection `SSHServer`: its hooks parse, ask the pure
cores (`acl.evaluate`, `limits`, `forwarding.may_listen`) and apply the answer.

Authentication paths, all ending in the same access-rule check:
- JWT as the SSH password (keyboard-interactive is bridged to it by asyncssh);
- public keys from the target user's authorized_keys (`authorized_keys = true`);
- "none" with `disable_auth` (identity `peer:<source ip>`).
A refusal is one log line (reason code, never the token), an audit event, and a short
message to the client through the userauth banner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import asyncssh

from . import (__version__, account, acl, algorithms, asyncssh_caps, asyncssh_close, asyncssh_kexguess,
               asyncssh_keyopts, asyncssh_ping, asyncssh_sigalgs, asyncssh_tuning, forwarding, handshake, hostkeys)
from .audit import AuditSink, ForwardClosed, ForwardOpened, LoggingAuditSink, SessionRevoked
from .audit import AuthRefused as AuthRefusedEvent
from .auth import Identity, JWTValidator, key_identity, peer_identity
from .config import ServerSettings
from .detached import DetachableSession, DetachedSessions
from .detached_revoke import revoke_detached
from .errors import AuthRefused
from .idle import IdleWatch
from .limits import FD_RESERVE, AuthTries, Penalties, StartupGate, fds_free
from .log_budget import LogBudget
from .logs import event
from .replay_log import FILE_NAME as REPLAY_LOG_NAME
from .remedies import with_remedy
from .replay_log import ReplayLog
from .session import ChildSession, ConnectionInfo, SessionContext, pam_service, resolve_subsystem
from .session._leftovers import cgroup_scope, end_leftovers
from .users import LocalUser, lookup_user_sync

log = logging.getLogger("meshsshd.server")

JWT_MARKER = "meshsshd-jwt"
SOFTWARE_VERSION = "meshsshd_" + ".".join(__version__.split(".")[:2])
PAM_FILE = "/etc/pam.d/meshsshd"


def server_version(settings: ServerSettings) -> str:
    """Software part of the identification string; the JWT marker tells clients
    (`meshssh detect`) that a token is expected as the password."""
    if jwt_enabled(settings):
        return f"{SOFTWARE_VERSION} {JWT_MARKER}"
    return SOFTWARE_VERSION


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


class _Connection(asyncssh.SSHServer):
    """One client connection, from TCP accept to close."""

    def __init__(self, server: MeshSSHServer) -> None:
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
            assert isinstance(victim, _Connection)
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
        ctx = self.ctx
        assert self.conn is not None
        return self.remote_listeners.listen(   # forward.opened once the port is bound
            self.conn, ctx.user, listen_host, listen_port, settings.own_addresses,
            lambda: self.server.audit.emit(ForwardOpened(**ctx.base_event(""), forward=f"remote {listen_host}:{listen_port}")))

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


def _handshake_stage(connection: Hashable) -> int:
    """How far a pre-auth connection got: 0 silent, 1 sent its identification string,
    2 finished key exchange (asyncssh records the ciphers at NEWKEYS)."""
    assert isinstance(connection, _Connection)
    conn = connection.conn
    if conn is None or not conn.get_extra_info("client_version"):
        return 0
    return 2 if conn.get_extra_info("recv_cipher") else 1


class MeshSSHServer:
    """The embedded SSH server; see the module docstring."""

    def __init__(self, settings: ServerSettings, *, audit: AuditSink | None = None) -> None:
        self.settings = settings
        self.audit: AuditSink = audit or LoggingAuditSink()
        self.validator: JWTValidator | None = None
        self.gate = StartupGate(settings.limits, stage=_handshake_stage)
        self.penalties = Penalties(settings.limits)
        self.connections: set[_Connection] = set()
        self.session_registry: dict[str, dict[str, Any]] = {}
        self.cgroup_scope = cgroup_scope(settings.state_dir)   # whose login cgroups are ours
        self.detached = DetachedSessions(lambda: self.settings, self.audit)
        self.stats: dict[str, int] = {"dropped": 0, "evicted": 0}
        self.forward_log = LogBudget()   # forward.refused lines per source address
        self._host_keys: hostkeys.HostKeys | None = None
        self._acceptors: dict[tuple[str, int], asyncssh.SSHAcceptor] = {}
        self._prune_task: asyncio.Task | None = None
        bad = algorithms.weak_names(algorithms.KEX_ALGS + algorithms.ENCRYPTION_ALGS + algorithms.mac_algs(False))
        assert not bad, f"weak algorithms in the allowlist: {bad}"

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        asyncssh_tuning.skip_ignore_packets()
        asyncssh_ping.answer_pings()
        asyncssh_kexguess.judge_guesses()
        asyncssh_sigalgs.refuse_weak_signatures()
        asyncssh_close.hold_closed_sessions()
        asyncssh_caps.cap_channel_requests()
        asyncssh_keyopts.enforceable()
        loop = asyncio.get_running_loop()
        self._host_keys = await loop.run_in_executor(
            None, hostkeys.load_or_create, self.settings.state_dir, self.settings.use_system_host_keys)
        await self._update_validator(self.settings)
        # Before any login can start: a crashed run's logins are ended and audited.
        await end_leftovers(self.cgroup_scope, self.audit)
        for address in self.settings.listen:
            await self._bind(address)
        self._prune_task = loop.create_task(self._prune_forever())
        await self.detached.start()
        if os.geteuid() == 0 and await loop.run_in_executor(None, pam_service) is None:
            event(log, "server.pam-missing", level=logging.WARNING, path=PAM_FILE,
                  effect="no PAM account or session modules (limits, loginuid, systemd session); "
                         "meshsshd itself still refuses expired accounts and honours nologin",
                  fix=f"install deploy/pam.d/meshsshd as {PAM_FILE}")
        # Sessions that outlived a previous daemon answer to the rules it starts with.
        await revoke_detached(self.detached, lambda *login: still_allowed(self.settings, *login))
        event(log, "server.started", listen=[f"{h}:{p}" for h, p in self.bound_addresses],
              jwt=jwt_enabled(self.settings), disable_auth=self.settings.disable_auth,
              authorized_keys=self.settings.authorized_keys, sftp=self.settings.sftp)

    def _listen_options(self, settings: ServerSettings) -> dict[str, Any]:
        limits = settings.limits
        assert self._host_keys is not None
        return dict(
            server_host_keys=algorithms.host_keypairs(self._host_keys.keys),
            server_version=server_version(settings),
            encoding=None,
            line_editor=False,
            allow_scp=False,
            x11_forwarding=False,
            agent_forwarding=settings.agent_forwarding,
            login_timeout=limits.login_grace,
            keepalive_interval=limits.keepalive_interval,
            keepalive_count_max=limits.keepalive_count_max,
            # No GSSAPI logins. Left at its default, asyncssh resolves the host's FQDN
            # (socket.getfqdn: NSS, DNS) for every connection to name a GSS service.
            gss_host=None,
            # OpenSSH's UpdateHostKeys: after login, all our host keys (hostkeys-00), and
            # proofs of them on request, so a client learns keys added before a rotation.
            send_server_host_keys=True,
            rekey_bytes=settings.rekey_limit[0],
            rekey_seconds=settings.rekey_limit[1] or None,
            **algorithms.listen_options(settings.strict_algorithms),
        )

    async def _bind(self, address: tuple[str, int]) -> None:
        host, port = address
        acceptor = await asyncssh.listen(
            host, port, server_factory=lambda: _Connection(self), reuse_address=True,
            backlog=max(128, self.settings.limits.max_startups[2] * 2), **self._listen_options(self.settings))
        self._acceptors[address] = acceptor

    async def stop(self) -> None:
        await self.detached.stop()
        if self._prune_task is not None:
            self._prune_task.cancel()
            self._prune_task = None
        for acceptor in self._acceptors.values():
            acceptor.close()
        for acceptor in self._acceptors.values():
            await acceptor.wait_closed()
        self._acceptors.clear()
        for c in list(self.connections):
            for s in list(c.sessions):
                s.close("the server is shutting down")
            if c.conn is not None:
                c.conn.disconnect(asyncssh.DISC_BY_APPLICATION, "meshsshd is shutting down")
        if self.validator is not None:
            await self.validator.close()
            self.validator = None
        event(log, "server.stopped")

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(60)
            self.penalties.prune()

    # ---- settings -------------------------------------------------------------------
    async def _update_validator(self, settings: ServerSettings) -> None:
        if jwt_enabled(settings):
            if self.validator is None:
                self.validator = JWTValidator(
                    settings.jwt, replay_log=ReplayLog(settings.state_dir / REPLAY_LOG_NAME))
                await self.validator.restore()
            else:
                self.validator.update(settings.jwt)

    async def apply(self, settings: ServerSettings) -> None:
        """Swap settings whole; rebind changed listeners; revoke what is no longer allowed."""
        old = self.settings
        self.settings = settings
        self.gate.limits = settings.limits
        self.penalties.limits = settings.limits
        await self._update_validator(settings)
        if not jwt_enabled(settings) and self.validator is not None:
            validator, self.validator = self.validator, None
            await validator.close()
        if self._host_keys is not None and old.use_system_host_keys != settings.use_system_host_keys:
            self._host_keys = await asyncio.get_running_loop().run_in_executor(
                None, hostkeys.load_or_create, settings.state_dir, settings.use_system_host_keys)
        wanted = set(settings.listen)
        for address in list(self._acceptors):
            if address not in wanted:
                acceptor = self._acceptors.pop(address)
                acceptor.close()
                await acceptor.wait_closed()
        for address, acceptor in self._acceptors.items():
            acceptor.update(**self._listen_options(settings))
        for address in settings.listen:
            if address not in self._acceptors:
                await self._bind(address)
        self._revoke_disallowed(settings)
        await revoke_detached(self.detached, lambda *login: still_allowed(settings, *login))
        event(log, "server.applied", listen=[f"{h}:{p}" for h, p in self.bound_addresses],
              rules=len(settings.access), jwt=jwt_enabled(settings))

    def _revoke_disallowed(self, settings: ServerSettings) -> None:
        for c in list(self.connections):
            if c.ctx is None or c.identity is None or c.user is None:
                continue
            login = "root" if c.user.is_root else c.login
            reason, message = still_allowed(settings, c.identity, login, c.info.client_ip)
            if reason:
                c.revoke(reason, message)
            else:
                c.recheck_forwards(settings)

    # ---- introspection --------------------------------------------------------------
    def open_sessions(self, identity: str) -> int:
        """Session channels `identity` holds open on all its connections."""
        return sum(1 for c in self.connections if c.ctx is not None and c.ctx.identity == identity
                   for s in c.sessions if not s.closed)

    def sessions(self) -> list[dict]:
        return [dict(s) for s in self.session_registry.values()]

    @property
    def host_public_keys(self) -> list[str]:
        return self._host_keys.public_lines if self._host_keys else []

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for acceptor in self._acceptors.values():
            for sock in acceptor.sockets or ():
                name = sock.getsockname()
                out.append((name[0], name[1]))
        return out

