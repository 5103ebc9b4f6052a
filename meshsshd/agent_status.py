"""What `meshsshd status` and the client read: the agent's status document, written to
status.json (world-readable, the client finds its mesh IP there) and the logged-in sessions
to sessions.json (0600, who is logged in is for root), each only when it changed. A mixin
of `agent.Agent`; the status loop also retries a map that failed transiently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import asdict, is_dataclass
from typing import Any

from .agent_map import maybe_await
from .errors import MeshsshdError, StateError
from .logs import event
from .netmap import SSH_PORT
from .state import PUBLIC_MODE, SECRET_MODE, write_json_async

log = logging.getLogger("meshsshd.agent")


def _plain(value: Any) -> Any:
    """A session description from the server as JSON-able data."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StatusMixin:
    """`Agent`'s status files; it reads the agent's map, credential, data plane, server,
    management connection and audit uplink, and `_on_netmap` for the retry."""

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
                sessions = [_plain(s) for s in await maybe_await(self.server.sessions())]
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
        updated = now_iso()
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
