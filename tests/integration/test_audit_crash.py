"""Audit events survive a kill -9 of the peer during a management outage: real
`meshmgmt serve`, real `meshsshd up`, logins while management is down, the peer killed,
both started again; every event arrives (at-least-once: audit_journal.py)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from .test_mesh_local import Mesh, connect, mesh  # noqa: F401  (fixture)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

LOGINS = 6


async def test_events_of_logins_during_an_outage_survive_kill_9(mesh: Mesh) -> None:
    _, b_id = mesh.ids()
    tokens = [mesh.bot.ssh_token(b_id) for _ in range(LOGINS)]
    mesh.mgmt.stop()
    mesh.b.wait(lambda s: not s["management"]["connected"], what="noticed management is gone")
    for i, token in enumerate(tokens):
        async with await connect(mesh, token) as conn:
            await conn.run(f"echo crash-marker-{i}", check=True, timeout=15)
    await asyncio.sleep(0.2)   # the last session.ended: emitted as the connection closed
    assert mesh.b.stop(signal.SIGKILL) == -signal.SIGKILL
    mesh.mgmt.start()
    mesh.b.start()
    mesh.b.wait(lambda s: s.get("pid") and s["management"]["connected"], timeout=30, what="reconnected")

    def execs() -> list[str]:
        events = mesh.mgmt.api("GET", f"/api/events?peer_id={b_id}&type=exec&limit=1000")["events"]
        return [e["command"] for e in events if e.get("command", "").startswith("echo crash-marker-")]

    deadline = time.monotonic() + 20
    while len(set(execs())) < LOGINS and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert sorted(set(execs())) == sorted(f"echo crash-marker-{i}" for i in range(LOGINS)), mesh.b.output()[-3000:]
    print(f"audit after kill -9: {len(set(execs()))}/{LOGINS} exec events arrived, "
          f"{len(execs()) - len(set(execs()))} twice")
    ended = mesh.mgmt.api("GET", f"/api/events?peer_id={b_id}&type=session.ended&limit=1000")["events"]
    started = mesh.mgmt.api("GET", f"/api/events?peer_id={b_id}&type=session.started&limit=1000")["events"]
    assert {e["session_id"] for e in started} <= {e["session_id"] for e in ended}
    assert '"audit.restored"' in mesh.b.output()
