"""Network maps for `meshsshd up`: check a map, turn it into server settings, and apply it
all-or-nothing (data plane, then the SSH server; a failure rolls the data plane back and
the map in force stays). Also what the agent serves from the persisted map after a
restart. A mixin of `agent.Agent`, kept apart from the sync stream that feeds it."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
from typing import Any

from .config import ServerSettings, find_sftp_server, settings_from_netmap
from .errors import ConfigError, DataplaneError, MeshsshdError, StateError
from .logs import event
from .mgmt_client import management_destinations
from .netmap import SSH_PORT, NetmapError, NetworkMap
from .state import StateDir, UpConfig, read_json, write_json_async

log = logging.getLogger("meshsshd.agent")


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


async def maybe_await(value: Any) -> Any:
    """The server (or a test's stand-in from `server_factory`) may answer directly or with an awaitable."""
    return await value if inspect.isawaitable(value) else value


class MapsMixin:
    """`Agent`'s map handling; it uses the agent's state, config, credential, data plane,
    server and lock, and `_write_status` from `agent_status.StatusMixin`."""

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
                await maybe_await(self.server.stop())
                self.server = None
                event(log, "ssh.stopped")
            return
        if self.server is None:
            server = self._make_server(settings)
            await maybe_await(server.start())
            self.server = server
            event(log, "ssh.started", listen=[f"{h}:{p}" for h, p in settings.listen])
        else:  # also rebinds when the mesh IP moved, and closes sessions no longer allowed
            await maybe_await(self.server.apply(settings))
