"""SIGHUP for `meshsshd up` (systemd's `ExecReload`): re-read the persisted flags and
re-apply the map in force with them, as sshd re-reads its config on HUP.

What can change live is what the map and the flags decide: which SSH features are on,
whether SSH is served at all. The interface, WireGuard port, data plane, management URL
and metrics address are bound at start; a change to them is logged as needing a restart
and otherwise ignored, so a reload never half-moves the mesh. A reload that fails keeps
the old settings and says so in one JSON line."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from .errors import MeshsshdError
from .logs import event

log = logging.getLogger("meshsshd.agent")

BOUND_AT_START = ("management_url", "interface", "wireguard_port", "dataplane", "metrics_listen")


async def reload_flags(agent: Any) -> None:
    """`agent`: the running `Agent` (its config, state dir, map in force)."""
    old = agent.config
    try:
        fresh = await asyncio.to_thread(agent.state.load_config)
    except MeshsshdError as exc:
        event(log, "config.reload_failed", logging.ERROR, error=str(exc), effect="the old settings stay in force")
        return
    needs_restart = [k for k in BOUND_AT_START if getattr(fresh, k) != getattr(old, k)]
    agent.config = dataclasses.replace(old, flags=fresh.flags)
    try:
        if agent.netmap is not None:
            await agent.apply_map(agent.netmap.to_dict(), persist=False, force=True)
    except MeshsshdError as exc:
        agent.config = old
        event(log, "config.reload_failed", logging.ERROR, error=str(exc), effect="the old settings stay in force")
        return
    event(log, "config.reloaded", flags=agent.config.flags.to_dict(), serving=agent.serving,
          **({"needs_restart": needs_restart} if needs_restart else {}))
    await agent.report_self()
