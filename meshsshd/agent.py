"""The managed peer (`meshsshd up`): register once, hold the sync stream, apply each map.

    Agent.run()
      ├── keys: WireGuard key and SSH host keys, created once in the state dir (0600)
      ├── register (only without a credential for this management URL)
      ├── serve from the persisted map, if any (a restart while management is down)
      ├── _sync_loop      one WebSocket at a time, exponential backoff with jitter
      │     └── apply_map  validate → data plane → server.apply(settings_from_netmap(...))
      │                    all-or-nothing: a failure rolls the data plane back, the old
      │                    map stays in force and is what the status shows
      ├── audit uplink    bounded queue of events to /api/peers/events (audit_uplink.py)
      ├── _status_loop    status.json for `meshsshd status` and the client
      └── metrics         optional Prometheus endpoint (metrics.py)

A PeerDeleted from management (401 or a "peer-deleted" message) is checked again with
backoff first (state "credential-refused", the reason in status.json): one refusal may be
a race or a replica behind, and the credential is this peer's identity. Refused
`refusals_before_deleted` times in a row, the agent stops the SSH server, removes the
data plane, forgets the credential and the map, and ends with exit code 3: the peer must
not keep serving with an identity its administrator removed.

Everything here is I/O glue; the decisions (what the nft table, the wg peers, the server
settings look like) are pure functions in `dataplane/` and `config.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import os
import random
import signal
import socket
import time
from dataclasses import asdict, is_dataclass
from typing import Any, Callable

from . import __version__, hostkeys
from .config import ServerSettings, find_sftp_server, settings_from_netmap
from .dataplane import Dataplane, make_dataplane, resolve_kind
from .dataplane import cleanup as dataplane_cleanup
from .errors import ConfigError, DataplaneError, MeshsshdError, StateError
from .logs import event
from .audit_uplink import ManagementAuditSink
from .mgmt_client import (
    HTTPManagementClient,
    ManagementClient,
    ManagementRejected,
    ManagementUnavailable,
    PeerDeleted,
    Registration,
    management_destinations,
)
from .netmap import SSH_PORT, NetmapError, NetworkMap
from .peerproof import private_key_from_b64
from .state import (PUBLIC_MODE, SECRET_MODE, Credential, StateDir, UpConfig, is_meshsshd, read_json,
                    write_json_async)

log = logging.getLogger("meshsshd.agent")

EXIT_PEER_DELETED = 3


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 10.0) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base·2^attempt)."""
    ceiling = min(cap, base * 2 ** min(attempt, 16))
    return random.uniform(ceiling / 2, ceiling)


def base_settings(state: StateDir, config: UpConfig, netmap: NetworkMap,
                  forward_protected: tuple[str, ...] = ()) -> ServerSettings:
    """The local half of the server settings: where to listen and what the flags allow;
    `forward_protected` is the management server's address (`management_destinations`)."""
    f = config.flags
    return ServerSettings(
        listen=((netmap.peer.mesh_ip, SSH_PORT),),
        state_dir=state.root,
        sftp=f.enable_ssh_sftp,
        local_port_forwarding=f.enable_ssh_local_port_forwarding,
        remote_port_forwarding=f.enable_ssh_remote_port_forwarding,
        root_login=f.enable_ssh_root,
        disable_auth=f.disable_ssh_auth,
        sftp_server=find_sftp_server(),
        agent_forwarding=not f.disable_ssh_agent_forwarding,
        forward_protected=forward_protected,
        managed=True,
    )


def validate_map(netmap: NetworkMap, peer_id: str) -> None:
    """Checks beyond the shape: the map must be about us and carry usable addresses."""
    if netmap.peer.id != peer_id:
        raise NetmapError(f"map is for peer {netmap.peer.id!r}, not for us ({peer_id!r})")
    try:
        ipaddress.ip_address(netmap.peer.mesh_ip)
        net = ipaddress.ip_network(netmap.network, strict=False)
    except ValueError as exc:
        raise NetmapError(f"map has a bad address: {exc}") from exc
    if ipaddress.ip_address(netmap.peer.mesh_ip) not in net:
        raise NetmapError(f"mesh IP {netmap.peer.mesh_ip} is outside the network {netmap.network}")


def _plain(value: Any) -> Any:
    """A session description from the server as JSON-able data."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Agent:
    map_retry_every = 5  # seconds between attempts to apply a map that failed transiently
    refusals_before_deleted = 5  # consecutive credential refusals (≈ 4-8 s) that mean deletion
    refusal_backoff = 0.5  # base of the backoff between those checks, seconds

    def __init__(
        self,
        state: StateDir,
        config: UpConfig,
        setup_key: str | None = None,
        mgmt: ManagementClient | None = None,
        dataplane: Dataplane | None = None,
        server_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.state = state
        self.config = config
        self.setup_key = setup_key
        self.mgmt: ManagementClient = mgmt or HTTPManagementClient(config.management_url)
        # Chosen once the mesh network is known (auto: loopback network → none).
        self._dataplane: Dataplane | None = dataplane
        self._server_factory = server_factory
        self.server: Any = None
        self.cred: Credential | None = None
        self.netmap: NetworkMap | None = None
        self.serving = False
        self.wg_public_key = ""
        self.host_key_lines: list[str] = []
        self.endpoints: tuple[str, ...] = config.endpoints
        self.uplink = ManagementAuditSink()
        self.metrics: Any = None
        self._dp_up = False
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._fatal: MeshsshdError | None = None
        self.failure: ManagementRejected | None = None   # why run() returned 2, for the CLI to say
        self._mgmt: dict[str, Any] = {"url": config.management_url, "connected": False}
        self._state_name = "starting"
        self._reason = ""
        self._last_map_error = ""
        self._last_status: dict[str, Any] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._retry_doc: Any = None
        self._mgmt_destinations: tuple[str, ...] = ()

    # lifecycle ---------------------------------------------------------------------
    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or a fatal condition; returns the exit code."""
        await asyncio.to_thread(self._prepare_state)  # raises before anything needs undoing
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        tasks: list[asyncio.Task[Any]] = []
        try:
            self.cred = await self._ensure_registered()
            if self._dataplane is None:
                self._dataplane = make_dataplane(self.config.dataplane, self.config.interface,
                                                 self.state.wireguard_key, self.config.wireguard_port,
                                                 network=self.cred.network)
            self.uplink.post = lambda batch: self.mgmt.post_events(self._require_cred(), batch)
            queued = await self.uplink.open(self.state.events_path)
            if queued:
                event(log, "audit.restored", count=queued)
            self.uplink.start()
            await self._start_metrics()
            await self._clean_previous_dataplane()
            await write_json_async(self.state.dataplane_path, self.dataplane.record(), PUBLIC_MODE)
            await self._serve_persisted_map()
            tasks = [
                asyncio.create_task(self._sync_loop(), name="sync"),
                asyncio.create_task(self._status_loop(), name="status"),
            ]
            stop_wait = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            for t in done:
                if t is not stop_wait and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            return 0
        except PeerDeleted as exc:
            self._fatal = exc
            self._state_name, self._reason = "credential-deleted", str(exc)
            event(log, "peer.deleted", logging.ERROR, reason=str(exc),
                  hint="ask an admin for a setup key and run meshsshd up --setup-key KEY again")
            await asyncio.to_thread(self.state.forget_credential)
            return EXIT_PEER_DELETED
        except ManagementRejected as exc:
            self._state_name, self._reason = "error", str(exc)
            self.failure = exc
            event(log, "agent.failed", logging.ERROR, reason=str(exc))
            return 2
        except ManagementUnavailable:
            if self._stop.is_set():  # stopped while waiting to register
                return 0
            raise
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: the flags again, applied to the map in force (meshsshd/agent_reload.py)."""
        from .agent_reload import reload_flags

        task = asyncio.get_running_loop().create_task(reload_flags(self))
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

    async def _clean_previous_dataplane(self) -> None:
        """A crashed run with other settings (another interface name) left its interface
        and table behind; the same settings are simply replaced by `up`."""
        try:
            old = await asyncio.to_thread(read_json, self.state.dataplane_path)
        except StateError:
            return
        if isinstance(old, dict) and old != self.dataplane.record():
            try:
                removed = await dataplane_cleanup(old)
            except MeshsshdError as exc:
                event(log, "dataplane.stale_cleanup_failed", logging.WARNING, error=str(exc))
                return
            if removed:
                event(log, "dataplane.stale_removed", removed=removed)

    @property
    def dataplane(self) -> Dataplane:
        if self._dataplane is None:
            from .dataplane._none import NoDataplane

            return NoDataplane()  # before registration nothing exists to set up or report
        return self._dataplane

    def _prepare_state(self) -> None:
        """Blocking setup: directory, single instance, keys, flags (runs in a thread)."""
        self.state.ensure()
        other = self.state.read_pid()
        if other and other != os.getpid() and is_meshsshd(other):
            raise StateError(f"meshsshd is already running for {self.state.root} (pid {other})")
        self.state.write_pid()
        self.state.save_config(self.config)
        _, self.wg_public_key = self.state.wireguard_keypair()
        keys = hostkeys.load_or_create(self.state.root)
        self.host_key_lines = keys.public_lines

    async def _shutdown(self) -> None:
        async with self._lock:
            if self.server is not None:
                with contextlib.suppress(Exception):
                    await _maybe_await(self.server.stop())
                self.server = None
            self.serving = False
            if self._dp_up or self._fatal is not None:
                try:
                    await self.dataplane.down()
                except MeshsshdError as exc:
                    event(log, "dataplane.down_failed", logging.WARNING, error=str(exc))
                self._dp_up = False
        try:
            await self.uplink.stop()
        except StateError as exc:
            event(log, "audit.save_failed", logging.ERROR, error=str(exc), lost=len(self.uplink.queue))
        if self.metrics is not None:
            await self.metrics.stop()
        await self.mgmt.close()
        if self._state_name not in ("credential-deleted", "error"):
            self._state_name = "stopped"
        self._mgmt["connected"] = False
        with contextlib.suppress(MeshsshdError):
            await self._write_status(force=True, stopped=True)
        with contextlib.suppress(FileNotFoundError):
            self.state.dataplane_path.unlink()
        self.state.remove_pid()
        event(log, "agent.stopped", state=self._state_name, reason=self._reason or None)

    # registration ------------------------------------------------------------------
    def _require_cred(self) -> Credential:
        if self.cred is None:
            raise ManagementUnavailable("not registered yet")
        return self.cred

    async def _ensure_registered(self) -> Credential:
        cred = await asyncio.to_thread(self.state.load_credential)
        url = self.config.management_url.rstrip("/")
        if cred is not None and cred.management_url.rstrip("/") == url:
            return cred
        if not self.setup_key:
            raise ConfigError(
                f"this peer is not registered with {url or 'a management server'}; "
                "run meshsshd up --management-url URL --setup-key KEY"
            )
        if not self.endpoints and resolve_kind(self.config.dataplane) == "wireguard":
            self.endpoints = await local_endpoints(self.config.interface, self.config.wireguard_port)
        req = Registration(
            setup_key=self.setup_key,
            wg_public_key=self.wg_public_key,
            ssh_host_key=self.host_key_lines[0] if self.host_key_lines else "",
            ssh_host_keys=tuple(self.host_key_lines),
            hostname=self.config.hostname or socket.gethostname(),
            flags=self.config.flags.to_dict(),
            version=__version__,
            endpoints=self.endpoints,
        )
        wg_private = private_key_from_b64((await asyncio.to_thread(self.state.wireguard_keypair))[0])
        attempt = 0
        while True:
            try:
                doc = await self.mgmt.register(req, wg_private)
                break
            except ManagementUnavailable as exc:
                delay = backoff_delay(attempt)
                attempt += 1
                self._mgmt.update(connected=False, last_error=str(exc))
                event(log, "register.retry", logging.WARNING, error=str(exc), retry_in=round(delay, 1))
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    raise ManagementUnavailable("stopped before registration finished")
                except asyncio.TimeoutError:
                    pass
        cred = Credential(
            peer_id=doc["peer_id"], credential=doc["credential"], management_url=url,
            name=str(doc.get("name", "")), fqdn=str(doc.get("fqdn", "")),
            mesh_ip=doc["mesh_ip"], network=str(doc.get("network", "")),
        )
        await asyncio.to_thread(self.state.save_credential, cred)
        event(log, "register.done", peer_id=cred.peer_id, mesh_ip=cred.mesh_ip, peer_name=cred.name)
        return cred

    # maps --------------------------------------------------------------------------
    async def _serve_persisted_map(self) -> None:
        try:
            doc = await asyncio.to_thread(read_json, self.state.netmap_path)
        except StateError as exc:
            event(log, "netmap.persisted_unreadable", logging.WARNING, error=str(exc))
            return
        if doc is None:
            return
        try:
            await self.apply_map(doc, persist=False)
            event(log, "netmap.restored", serial=self.netmap.serial if self.netmap else None)
        except MeshsshdError as exc:
            event(log, "netmap.restore_failed", logging.WARNING, error=str(exc))

    def should_serve(self, netmap: NetworkMap) -> bool:
        """The SSH server runs only when the local flag allows and management enables it."""
        return self.config.flags.allow_server_ssh and netmap.ssh.enabled

    async def apply_map(self, doc: Any, persist: bool = True, only_if_newer: bool = False,
                        force: bool = False) -> bool:
        """Apply one map all-or-nothing; False when it equals the current one (or, for a
        retry, when a newer map has been applied meanwhile). `force`: apply it even so
        (a reload whose flags changed what the same map means)."""
        cred = self._require_cred()
        try:
            netmap = NetworkMap.from_dict(doc)
            validate_map(netmap, cred.peer_id)
        except NetmapError as exc:
            raise ConfigError(f"network map rejected: {exc}") from exc
        serve = self.should_serve(netmap)
        # Re-resolved per map (the address may move); a failed lookup keeps the last one.
        self._mgmt_destinations = (await asyncio.to_thread(management_destinations, self.config.management_url)
                                   or self._mgmt_destinations)
        base = base_settings(self.state, self.config, netmap, self._mgmt_destinations)
        settings = settings_from_netmap(base, netmap) if serve else None
        async with self._lock:
            if self.netmap == netmap and self.serving == serve and self._dp_up and not force:
                return False
            if only_if_newer and self.netmap is not None and self.netmap.serial >= netmap.serial:
                return False
            prev, prev_serve = self.netmap, self.serving
            try:
                if not self._dp_up:
                    await self.dataplane.up(netmap, serve)
                    self._dp_up = True
                else:
                    await self.dataplane.apply(netmap, serve)
            except DataplaneError:
                await self._rollback_dataplane(prev, prev_serve)
                raise
            try:
                await self._apply_server(settings)
            except Exception as exc:
                await self._rollback_dataplane(prev, prev_serve)
                if isinstance(exc, MeshsshdError):
                    raise
                raise MeshsshdError(f"SSH server could not take the new map: {exc}") from exc
            if persist:  # before it shows in status.json: what status shows is on disk
                try:
                    await write_json_async(self.state.netmap_path, netmap.to_dict())
                except StateError as exc:  # serve the new map anyway; a restart gets the old one
                    event(log, "netmap.persist_failed", logging.ERROR, error=str(exc))
            self.netmap, self.serving = netmap, serve
            self._last_map_error = ""
            self._settle_state()
        event(log, "netmap.applied", serial=netmap.serial, peers=len(netmap.peers),
              rules=len(netmap.firewall_rules), ssh=serve)
        await self._write_status()
        return True

    def _settle_state(self) -> None:
        """State and reason from the map in force (after a map, or a refusal that passed)."""
        if self.netmap is None:
            self._state_name, self._reason = "starting", ""
        elif self.serving:
            self._state_name, self._reason = "serving", ""
        else:
            self._state_name, self._reason = "ssh-off", self._why_not_serving(self.netmap)

    def _why_not_serving(self, netmap: NetworkMap) -> str:
        if not self.config.flags.allow_server_ssh:
            return "SSH server not allowed on this peer (start with --allow-server-ssh)"
        if not netmap.ssh.enabled:
            return ("management has not enabled SSH on this peer (no policy grants SSH to it, "
                    "or an admin turned it off)")
        return ""

    async def _rollback_dataplane(self, prev: NetworkMap | None, prev_serve: bool) -> None:
        if prev is None or not self._dp_up:
            return
        try:
            await self.dataplane.apply(prev, prev_serve)
        except MeshsshdError as exc:
            event(log, "dataplane.rollback_failed", logging.ERROR, error=str(exc))

    def _make_server(self, settings: ServerSettings) -> Any:
        if self._server_factory is not None:
            return self._server_factory(settings, audit=self.uplink)
        from .audit import FanoutAuditSink, LoggingAuditSink
        from .server import MeshSSHServer

        return MeshSSHServer(settings, audit=FanoutAuditSink(LoggingAuditSink(), self.uplink))

    async def _apply_server(self, settings: ServerSettings | None) -> None:
        if settings is None:
            if self.server is not None:
                await _maybe_await(self.server.stop())
                self.server = None
                event(log, "ssh.stopped")
            return
        if self.server is None:
            server = self._make_server(settings)
            await _maybe_await(server.start())
            self.server = server
            event(log, "ssh.started", listen=[f"{h}:{p}" for h, p in settings.listen])
        else:  # also rebinds when the mesh IP moved, and closes sessions no longer allowed
            await _maybe_await(self.server.apply(settings))

    # sync ----------------------------------------------------------------------------
    async def _sync_loop(self) -> None:
        attempt = refusals = 0
        cred = self._require_cred()
        while not self._stop.is_set():
            try:
                async for msg in self.mgmt.sync(cred):
                    if not self._mgmt.get("connected"):
                        attempt = refusals = 0
                        if self._state_name == "credential-refused":
                            self._settle_state()
                        self._mgmt.update(connected=True, since=_now_iso(), last_error="")
                        event(log, "sync.connected", url=self.config.management_url)
                        task = asyncio.create_task(self.report_self())
                        self._background.add(task)  # keep a reference until it is done
                        task.add_done_callback(self._background.discard)
                        await self._write_status()
                    kind = msg.get("type")
                    if kind == "netmap":
                        await self._on_netmap(msg.get("netmap"))
                    elif kind == "error":
                        if msg.get("error") == "peer-deleted":
                            raise PeerDeleted(str(msg.get("message") or "this peer was deleted at management"))
                        event(log, "sync.error", logging.WARNING, error=msg.get("error"),
                              message=msg.get("message"))
                raise ManagementUnavailable("management closed the sync stream")
            except PeerDeleted as exc:
                refusals += 1
                if refusals >= self.refusals_before_deleted:
                    raise
                delay = backoff_delay(refusals - 1, base=self.refusal_backoff)
                self._mgmt.update(connected=False, last_error=str(exc))
                self._state_name = "credential-refused"
                self._reason = (f"{exc}; checking again in {delay:.0f} s (refusal {refusals} of "
                                f"{self.refusals_before_deleted} before this peer counts as deleted)")
                event(log, "sync.credential_refused", logging.WARNING, error=str(exc), refusals=refusals,
                      retry_in=round(delay, 2))
                await self._write_status()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            except (ManagementUnavailable, ManagementRejected) as exc:
                was = self._mgmt.get("connected")
                self._mgmt.update(connected=False, since=_now_iso() if was else self._mgmt.get("since"),
                                  last_error=str(exc))
                delay = backoff_delay(attempt)
                attempt += 1
                event(log, "sync.disconnected" if was else "sync.retry", logging.WARNING,
                      error=str(exc), retry_in=round(delay, 2), serving_from_serial=(
                          self.netmap.serial if self.netmap else None))
                await self._write_status()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)

    async def _on_netmap(self, doc: Any, retry: bool = False) -> None:
        self._retry_doc = None
        try:
            await self.apply_map(doc, only_if_newer=retry)
        except MeshsshdError as exc:
            self._last_map_error = str(exc)
            # A bad map stays bad; a data plane or listener failure (address busy, nft
            # briefly unavailable) may pass, so that map is tried again until a newer one.
            retry = not isinstance(exc, ConfigError)
            if retry:
                self._retry_doc = doc
            event(log, "netmap.rejected", logging.ERROR, error=str(exc), retry=retry,
                  keeping_serial=self.netmap.serial if self.netmap else None)
            await self._write_status()

    async def report_self(self) -> None:
        """Tell management our flags, version, endpoints and host keys (best effort)."""
        body = {
            "flags": self.config.flags.to_dict(),
            "version": __version__,
            "endpoints": list(self.endpoints),
            "ssh_host_key": self.host_key_lines[0] if self.host_key_lines else "",
            "ssh_host_keys": self.host_key_lines,
        }
        try:
            await self.mgmt.update_self(self._require_cred(), body)
        except PeerDeleted:
            pass  # the sync stream reports it and stops the daemon
        except MeshsshdError as exc:
            event(log, "report_self.failed", logging.WARNING, error=str(exc))

    # status --------------------------------------------------------------------------
    async def status_doc(self) -> dict[str, Any]:
        dp: dict[str, Any] = {"kind": self.dataplane.kind}
        with contextlib.suppress(MeshsshdError):
            dp = await self.dataplane.status() if self._dp_up else dp
        handshakes = dp.get("peers", {})
        nm = self.netmap
        cred = self.cred
        sessions: list[Any] = []
        if self.server is not None and hasattr(self.server, "sessions"):
            with contextlib.suppress(Exception):
                sessions = [_plain(s) for s in await _maybe_await(self.server.sessions())]
        peers = []
        for p in nm.peers if nm else ():
            hs = handshakes.get(p.wg_public_key, {}) if p.wg_public_key else {}
            peers.append({
                "id": p.id, "name": p.name, "fqdn": p.fqdn, "mesh_ip": p.mesh_ip,
                "ssh_enabled": p.ssh_enabled, "endpoint": hs.get("endpoint", ""),
                "latest_handshake": hs.get("latest_handshake", 0),
            })
        return {
            "pid": os.getpid(),
            "state": self._state_name,
            "serving": self.server is not None,  # the SSH server listens on mesh_ip:22022
            "reason": self._reason,
            "state_dir": str(self.state.root),
            "peer_id": cred.peer_id if cred else "",
            "name": (nm.peer.name if nm else cred.name if cred else ""),
            "fqdn": (nm.peer.fqdn if nm else cred.fqdn if cred else ""),
            "mesh_ip": (nm.peer.mesh_ip if nm else cred.mesh_ip if cred else ""),
            "network": (nm.network if nm else cred.network if cred else ""),
            "management_url": self.config.management_url,
            "management": dict(self._mgmt),
            "netmap_serial": nm.serial if nm else None,
            "netmap_error": self._last_map_error,
            "dataplane": {k: v for k, v in dp.items() if k != "peers"},
            "ssh": {
                "running": self.server is not None,
                "listen": f"{nm.peer.mesh_ip}:{SSH_PORT}" if nm and self.server is not None else "",
                "enabled_by_management": bool(nm and nm.ssh.enabled),
                "flags": self.config.flags.to_dict(),
            },
            "peers": peers,
            "sessions": sessions,
            "metrics_listen": self.config.metrics_listen,
            "audit": {"queued": len(self.uplink.queue), "dropped": self.uplink.dropped,
                      "delivered": self.uplink.delivered},
        }

    async def _write_status(self, force: bool = False, stopped: bool = False) -> None:
        doc = await self.status_doc()
        if stopped:
            doc["pid"] = None
            doc["serving"] = False
            doc["ssh"]["running"] = False
            doc["sessions"] = []
        if not force and doc == self._last_status:
            return
        # Who is logged in is for root: the sessions go to their own 0600 file, and the
        # world-readable status.json (the client reads its mesh IP there) only counts them.
        public = {k: v for k, v in doc.items() if k != "sessions"}
        updated = _now_iso()
        try:
            await write_json_async(self.state.sessions_path, {"sessions": doc["sessions"], "updated": updated},
                                   SECRET_MODE)
            await write_json_async(self.state.status_path,
                                   {**public, "session_count": len(doc["sessions"]), "updated": updated},
                                   PUBLIC_MODE)
        except StateError as exc:  # status is for people; a full disk must not stop serving
            event(log, "status.write_failed", logging.WARNING, error=str(exc))
            return
        self._last_status = doc

    async def _status_loop(self) -> None:
        """status.json every second when it changed; a failed map is retried every 5 s."""
        tick = 0
        while True:
            await self._write_status()
            await asyncio.sleep(1.0)
            tick += 1
            if self._retry_doc is not None and tick % self.map_retry_every == 0:
                await self._on_netmap(self._retry_doc, retry=True)

    async def _start_metrics(self) -> None:
        if not self.config.metrics_listen:
            return
        from .metrics import MetricsServer

        self.metrics = MetricsServer(self.config.metrics_listen, agent=self)
        self.uplink.on_event = self.metrics.observe
        try:
            await self.metrics.start()
        except OSError as exc:
            self.metrics = None
            raise ConfigError(f"cannot serve metrics on {self.config.metrics_listen}: {exc.strerror}") from exc


async def local_endpoints(interface: str, port: int) -> tuple[str, ...]:
    """This host's global IPv4 addresses (not the mesh interface) with the WireGuard port."""
    from .dataplane._exec import run

    res = await run(["ip", "-o", "-4", "address", "show", "scope", "global"], check=False)
    return endpoints_from_ip_output(res.stdout, interface, port)


def endpoints_from_ip_output(text: str, interface: str, port: int) -> tuple[str, ...]:
    """`ip -o -4 address show` lines → ("192.0.2.5:51820", ...), skipping the mesh interface."""
    out = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[1] != interface and cols[2] == "inet":
            out.append(f"{cols[3].split('/')[0]}:{port}")
    return tuple(out)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
