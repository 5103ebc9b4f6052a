"""The SSH listener: host keys, listening sockets, settings and the live connections.

`MeshSSHServer` owns the listening sockets, host keys, the JWT validator and the live
connections (`connection.Connection`, one per client); it only ever sees a
`ServerSettings` (standalone `meshsshd serve` builds it from TOML, managed `meshsshd up`
from the network map) and `apply()` swaps it whole, rebinding listeners and re-checking
every live login (`still_allowed`) and forward against the new settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import asyncssh

from . import (__version__, algorithms, asyncssh_caps, asyncssh_close, asyncssh_kexguess, asyncssh_keyopts,
               asyncssh_ping, asyncssh_sigalgs, asyncssh_tuning, hostkeys)
from .audit import AuditSink, LoggingAuditSink
from .auth import JWTValidator
from .config import ServerSettings
from .connection import Connection, handshake_stage, jwt_enabled, still_allowed
from .detached import DetachedSessions, revoke_detached
from .limits import Penalties, StartupGate
from .log_budget import LogBudget
from .logs import event
from .replay_log import FILE_NAME as REPLAY_LOG_NAME
from .replay_log import ReplayLog
from .session import pam_service
from .session._leftovers import cgroup_scope, end_leftovers

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


class MeshSSHServer:
    """The embedded SSH server; see the module docstring."""

    def __init__(self, settings: ServerSettings, *, audit: AuditSink | None = None) -> None:
        self.settings = settings
        self.audit: AuditSink = audit or LoggingAuditSink()
        self.validator: JWTValidator | None = None
        self.gate = StartupGate(settings.limits, stage=handshake_stage)
        self.penalties = Penalties(settings.limits)
        self.connections: set[Connection] = set()
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
            host, port, server_factory=lambda: Connection(self), reuse_address=True,
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

