"""Single-machine mesh: real `meshmgmt serve` + two `meshsshd up --dataplane none` peers.

Peers get loopback mesh addresses from a random 127.x.y.0/24, so each serves SSH on its
own address :22022 and the client binds peer A's address as its source, exactly as on a
WireGuard mesh. Logins use SSH tokens from the management's issuer (a service user with
client credentials, then token exchange for the target peer).

The tests share one mesh and run in order: policy, revocation, toggle, outage, restart,
deletion, down.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from tests.support import free_port, os_user, require_root

from .peerkit import HTTPError, Identity, Management, Peer, host_keys_from_map, loopback_network, pid_gone

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


@dataclass
class Mesh:
    mgmt: Management
    a: Peer
    b: Peer
    bot: Identity
    user: str
    policy_id: str
    setup_key: str
    metrics_port: int

    def ids(self) -> tuple[str, str]:
        return self.a.status()["peer_id"], self.b.status()["peer_id"]

    def ssh_policy(self) -> dict:
        return {"name": "a-to-b", "enabled": True, "rules": [
            {"sources": ["clients"], "destinations": ["servers"], "protocol": "ssh", "local_users": [self.user]}]}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    require_root()  # OS users for the sessions
    root = tmp_path_factory.mktemp("mesh")
    mgmt = Management(root / "mgmt", loopback_network())
    mgmt.init()
    mgmt.start()
    metrics_port = free_port()
    peers: list[Peer] = []
    try:
        with os_user("mml") as pw:
            key = mgmt.api("POST", "/api/setup-keys", {"name": "test", "reusable": True})["key"]
            a = Peer("peer-a", root / "a" / "state", mgmt.url, extra=["--dataplane", "none"])
            b = Peer("peer-b", root / "b" / "state", mgmt.url,
                     extra=["--dataplane", "none", "--metrics-listen", f"127.0.0.1:{metrics_port}"])
            for p in (a, b):
                p.state_dir.parent.mkdir(parents=True)
                peers.append(p)
                p.start(key, ["--allow-server-ssh"])
            for p in (a, b):
                p.wait(lambda s: s.get("netmap_serial") is not None, what="first map")
            bot = Identity(mgmt, "bot@example.com")
            mgmt.api("POST", "/api/groups", {"name": "clients", "peers": ["peer-a"], "users": [bot.email]})
            mgmt.api("POST", "/api/groups", {"name": "servers", "peers": ["peer-b"]})
            m = Mesh(mgmt, a, b, bot, pw.pw_name, "", key, metrics_port)
            m.policy_id = mgmt.api("POST", "/api/policies", m.ssh_policy())["id"]
            # Someone else keeps SSH on peer B enabled, so removing the bot's policy revokes
            # the bot's sessions rather than stopping the whole server.
            mgmt.api("POST", "/api/policies", {"name": "ops", "enabled": True, "rules": [
                {"sources": ["user:ops@example.com"], "destinations": ["servers"], "protocol": "ssh",
                 "local_users": ["ops"]}]})
            b.wait(lambda s: s["ssh"]["running"], what="SSH serving")
            yield m
    except BaseException:
        for p in peers:
            print(f"---- {p.name}\n{p.output()[-6000:]}")
        print("---- mgmt\n" + (mgmt.proc.output()[-4000:] if mgmt.proc else ""))
        raise
    finally:
        for p in peers:
            p.stop()
        mgmt.stop()


def known_hosts(mesh: Mesh) -> tuple[list[asyncssh.SSHKey], list, list]:
    _, b_id = mesh.ids()
    return [asyncssh.import_public_key(k) for k in host_keys_from_map(mesh.a, b_id)], [], []


async def connect(mesh: Mesh, token: str, source: str | None = None, port: int = 22022) -> asyncssh.SSHClientConnection:
    b_ip = mesh.b.status()["mesh_ip"]
    return await asyncio.wait_for(asyncssh.connect(
        b_ip, port, local_addr=(source or mesh.a.status()["mesh_ip"], 0), username=mesh.user,
        password=token, known_hosts=known_hosts(mesh), preferred_auth="password",
    ), 15)


async def login_runs(mesh: Mesh, command: str = "id -un") -> str:
    _, b_id = mesh.ids()
    async with await connect(mesh, mesh.bot.ssh_token(b_id)) as conn:
        result = await conn.run(command, check=True, timeout=15)
        return str(result.stdout)


def metrics(mesh: Mesh) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"   # Prometheus's own
        return r.read().decode()


def metric_value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def port_open(ip: str, port: int = 22022) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1):
            return True
    except OSError:
        return False


# --- tests, in order -------------------------------------------------------------------------


def test_status_shows_management_mesh_ip_peers_and_ssh(mesh: Mesh) -> None:
    res = mesh.b.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    net = mesh.mgmt.network.rsplit(".", 1)[0]
    assert doc["running"] and doc["state"] == "serving" and doc["management"]["connected"]
    assert doc["serving"] is True and '"serving": true' in res.stdout  # what scripts grep for
    assert doc["mesh_ip"].startswith(net + ".") and doc["ssh"]["listen"] == f"{doc['mesh_ip']}:22022"
    assert [p["name"] for p in doc["peers"]] == ["peer-a"]
    assert doc["ssh"]["flags"]["allow_server_ssh"] is True
    human = mesh.a.cli("status")
    assert human.returncode == 0
    assert "connected" in human.stdout and "peer-b" in human.stdout and doc["mesh_ip"] in human.stdout
    assert "SSH server:  stopped" in human.stdout  # A has no policy granting SSH to it


def test_a_bad_setup_key_is_refused_with_the_reason(mesh: Mesh, tmp_path: Path) -> None:
    p = Peer("peer-x", tmp_path / "x" / "state", mesh.mgmt.url, extra=["--dataplane", "none"])
    p.state_dir.parent.mkdir(parents=True)
    p.start("mk_not-a-real-key")
    assert p.proc is not None and p.proc.popen.wait(20) == 2
    assert "unknown setup key" in p.output()
    # besides the JSON log line, one line for the person at the terminal, as other errors
    human = [line for line in p.output().splitlines() if line.startswith("meshsshd: ")]
    assert len(human) == 1 and "unknown setup key" in human[0], p.output()
    assert not (p.state_dir / "credential.json").exists()


async def test_policy_allows_login_from_peer_a(mesh: Mesh) -> None:
    out = await login_runs(mesh, "id -un; echo $SSH_CONNECTION")
    user, conn_line = out.split("\n")[:2]
    assert user == mesh.user
    assert conn_line.split()[0] == mesh.a.status()["mesh_ip"]  # the server saw peer A as source
    # The session's audit events reach management, attributed to peer B.
    _, b_id = mesh.ids()
    deadline = time.monotonic() + 10
    types: set[str] = set()
    while time.monotonic() < deadline and not {"session.started", "exec", "session.ended"} <= types:
        events = mesh.mgmt.api("GET", f"/api/events?peer_id={b_id}&limit=1000")["events"]
        types = {e["type"] for e in events}
        await asyncio.sleep(0.1)
    assert {"session.started", "exec", "session.ended"} <= types, types
    text = metrics(mesh)
    assert metric_value(text, "meshsshd_netmap_serial") == mesh.b.status()["netmap_serial"]
    assert metric_value(text, "meshsshd_ssh_serving") == 1
    assert metric_value(text, 'meshsshd_auth_successes_total{method="jwt"}') >= 1
    assert metric_value(text, "meshsshd_sessions_started_total") >= 1


async def test_logins_from_elsewhere_or_to_unpermitted_peers_are_refused(mesh: Mesh) -> None:
    a_id, b_id = mesh.ids()
    stranger = mesh.mgmt.network.rsplit(".", 1)[0] + ".250"  # in the mesh range, but no peer
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(mesh, mesh.bot.ssh_token(b_id), source=stranger)
    with pytest.raises(HTTPError) as info:  # no policy lets the bot reach peer A
        mesh.bot.ssh_token(a_id)
    assert info.value.status in (400, 403)
    assert not port_open(mesh.a.status()["mesh_ip"])  # and A serves no SSH at all
    # The refusal is counted by reason.
    deadline = time.monotonic() + 5
    while "meshsshd_auth_failures_total{reason=" not in metrics(mesh) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert "meshsshd_auth_failures_total{reason=" in metrics(mesh)


async def test_live_session_is_closed_when_the_policy_goes(mesh: Mesh) -> None:
    _, b_id = mesh.ids()
    conn = await connect(mesh, mesh.bot.ssh_token(b_id))
    proc = await conn.create_process("echo started; sleep 60")
    assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == "started"
    # `meshsshd status` lists the live session.
    await asyncio.to_thread(mesh.b.wait, lambda s: s.get("session_count") == 1, 10, "a live session")
    # Who is logged in stays out of the world-readable status.json; sessions.json is root's.
    public = (mesh.b.state_dir / "status.json")
    assert public.stat().st_mode & 0o777 == 0o644
    assert mesh.bot.email not in public.read_text() and "sessions" not in json.loads(public.read_text())
    private = mesh.b.state_dir / "sessions.json"
    assert private.stat().st_mode & 0o777 == 0o600
    (live,) = json.loads(private.read_text())["sessions"]
    assert live["identity"] == mesh.bot.email and live["local_user"] == mesh.user
    assert f"{mesh.user} ← {mesh.bot.email} from peer-a" in mesh.b.cli("status").stdout
    t0 = time.monotonic()
    mesh.mgmt.api("DELETE", f"/api/policies/{mesh.policy_id}")
    await asyncio.wait_for(conn.wait_closed(), 10)
    elapsed = time.monotonic() - t0
    out = await proc.stderr.read() if not proc.stderr.at_eof() else ""
    await proc.wait()
    conn.close()
    print(f"revocation took {elapsed:.2f}s")
    assert elapsed < 1.0, f"revocation took {elapsed:.2f}s"  # the issue: "within a second"
    assert "access revoked" in out  # the client is told why
    assert mesh.b.status()["ssh"]["running"]  # only the session went, not the server
    # New logins are refused (the token exchange already says no)...
    with pytest.raises(HTTPError):
        mesh.bot.ssh_token(b_id)
    # ...and come back with the policy.
    mesh.policy_id = mesh.mgmt.api("POST", "/api/policies", mesh.ssh_policy())["id"]
    mesh.b.wait(lambda s: s["ssh"]["running"], what="serving again")
    assert (await login_runs(mesh)).strip() == mesh.user


async def test_ssh_toggle_stops_and_starts_the_server(mesh: Mesh) -> None:
    _, b_id = mesh.ids()
    b_ip = mesh.b.status()["mesh_ip"]
    # A plain tcp/22 policy grants SSH only while the admin toggle is on.
    ops = next(p for p in mesh.mgmt.api("GET", "/api/policies")["policies"] if p["name"] == "ops")
    ops_id, ops = ops["id"], {k: ops[k] for k in ("name", "rules")}
    mesh.mgmt.api("PUT", f"/api/policies/{ops_id}", {**ops, "enabled": False})
    tcp = {"name": "a-to-b", "enabled": True, "rules": [
        {"sources": ["clients"], "destinations": ["servers"], "protocol": "tcp", "ports": ["22"],
         "local_users": [mesh.user]}]}
    mesh.mgmt.api("PUT", f"/api/policies/{mesh.policy_id}", tcp)
    mesh.mgmt.api("PUT", f"/api/peers/{b_id}", {"ssh_enabled": False})
    mesh.b.wait(lambda s: not s["ssh"]["running"] and s["state"] == "ssh-off", what="SSH off")
    assert not port_open(b_ip)
    mesh.mgmt.api("PUT", f"/api/peers/{b_id}", {"ssh_enabled": True})
    mesh.b.wait(lambda s: s["ssh"]["running"], what="SSH on")
    assert (await login_runs(mesh)).strip() == mesh.user
    mesh.mgmt.api("PUT", f"/api/policies/{mesh.policy_id}", mesh.ssh_policy())
    mesh.mgmt.api("PUT", f"/api/policies/{ops_id}", {**ops, "enabled": True})


def test_sighup_reloads_the_flags_and_keeps_running(mesh: Mesh) -> None:
    """`systemctl reload` (SIGHUP) re-reads flags.json and re-applies the map in force:
    SSH stops and starts with `allow_server_ssh`, the daemon stays up (HUP used to kill it
    silently), and what cannot move live is named, not half-applied."""
    b = mesh.b
    assert b.proc is not None
    b.wait(lambda s: s["ssh"]["running"], what="SSH serving before the reload")
    pid = b.proc.popen.pid
    flags_file = b.state_dir / "flags.json"
    original = flags_file.read_text()

    def edit_and_hup(**change: object) -> None:
        doc = json.loads(flags_file.read_text())
        doc.update({k: v for k, v in change.items() if k != "flags"})
        doc["flags"].update(change.get("flags", {}))
        flags_file.write_text(json.dumps(doc))
        os.kill(pid, signal.SIGHUP)

    try:
        edit_and_hup(flags={"allow_server_ssh": False}, interface="other0")
        b.wait(lambda s: not s["ssh"]["running"], what="SSH stopped by the reload")
        edit_and_hup(flags={"allow_server_ssh": True})
        b.wait(lambda s: s["ssh"]["running"], what="SSH back after the second reload")
    finally:
        flags_file.write_text(original)
    assert b.proc.popen.poll() is None and b.status()["pid"] == pid
    reloads = [json.loads(line) for line in b.output().splitlines() if '"config.reloaded"' in line]
    # (serving comes back with management's next map, which the reported flag brings)
    assert [r["flags"]["allow_server_ssh"] for r in reloads[-2:]] == [False, True], reloads
    assert reloads[-2]["needs_restart"] == ["interface"]


async def test_management_outage_restart_and_resync(mesh: Mesh) -> None:
    _, b_id = mesh.ids()
    tokens = [mesh.bot.ssh_token(b_id) for _ in range(2)]
    conn = await connect(mesh, mesh.bot.ssh_token(b_id))

    def sessions_seen() -> int:
        return len(mesh.mgmt.api("GET", f"/api/events?peer_id={b_id}&type=session.started&limit=1000")["events"])

    await asyncio.sleep(1.0)  # let earlier events be delivered
    before = sessions_seen()
    mesh.mgmt.stop()
    mesh.b.wait(lambda s: not s["management"]["connected"], what="noticed management is gone")
    # The live session goes on, and a new login with a still-valid token works.
    assert (await conn.run("echo alive", check=True, timeout=10)).stdout.strip() == "alive"
    async with await connect(mesh, tokens[0]) as c2:
        assert (await c2.run("id -un", check=True, timeout=10)).stdout.strip() == mesh.user
    conn.close()
    # Restart peer B while management is down: it serves from the persisted map.
    serial = mesh.b.status()["netmap_serial"]
    assert mesh.b.stop() == 0
    mesh.b.start()  # no flags: they were persisted
    mesh.b.wait(lambda s: s.get("pid") and s["ssh"]["running"] and s["netmap_serial"] == serial,
                what="serving from the persisted map")
    async with await connect(mesh, tokens[1]) as c3:
        assert (await c3.run("id -un", check=True, timeout=10)).stdout.strip() == mesh.user
    # Management comes back: both peers resync, and a change reaches them.
    mesh.mgmt.start()
    for p in (mesh.a, mesh.b):
        p.wait(lambda s: s["management"]["connected"], timeout=30, what="reconnected")
    policy = mesh.ssh_policy()
    policy["rules"].append({"sources": ["clients"], "destinations": ["servers"], "protocol": "tcp",
                            "ports": ["8080"]})
    mesh.mgmt.api("PUT", f"/api/policies/{mesh.policy_id}", policy)

    def has_8080(_: dict) -> bool:
        doc = json.loads((mesh.b.state_dir / "netmap.json").read_text())
        return doc["serial"] > serial and any(r["ports"] == ["8080"] for r in doc["firewall_rules"])

    mesh.b.wait(has_8080, what="the change made after the resync")
    assert (await login_runs(mesh)).strip() == mesh.user
    # The three sessions held during the outage were audited too: queued in memory, saved
    # across B's restart (events.jsonl) and delivered once management was back.
    deadline = time.monotonic() + 15
    while sessions_seen() < before + 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert sessions_seen() >= before + 4


async def test_deleted_peer_stops_serving_and_says_why(mesh: Mesh) -> None:
    _, b_id = mesh.ids()
    b_ip = mesh.b.status()["mesh_ip"]
    conn = await connect(mesh, mesh.bot.ssh_token(b_id))
    mesh.mgmt.api("DELETE", f"/api/peers/{b_id}")
    assert mesh.b.proc is not None
    mesh.b.proc.popen.wait(15)
    assert mesh.b.proc.popen.returncode == 3
    await asyncio.wait_for(conn.wait_closed(), 10)
    assert not port_open(b_ip)
    st = mesh.b.status()
    assert st["state"] == "credential-deleted" and "peer" in st["reason"]
    res = mesh.b.cli("status")
    assert res.returncode == 3 and "credential-deleted" in res.stdout and "deleted" in res.stdout
    # Restarting without a setup key refuses with a hint; with one, it joins again.
    mesh.b.start()
    assert mesh.b.proc is not None and mesh.b.proc.popen.wait(15) == 2
    assert "--setup-key" in mesh.b.output()
    mesh.b.start(mesh.setup_key)
    mesh.b.wait(lambda s: s.get("state") in ("ssh-off", "serving") and s.get("pid"), what="re-registered")
    assert mesh.b.status()["peer_id"] != b_id


def test_flags_persist_and_are_reported_to_management(mesh: Mesh) -> None:
    a_id, _ = mesh.ids()
    assert mesh.a.stop() == 0
    mesh.a.start(flags=["--enable-ssh-sftp"])  # one new flag; the others come from flags.json
    mesh.a.wait(lambda s: s.get("pid") and s["management"]["connected"], what="A back")
    deadline = time.monotonic() + 10
    while True:
        flags = mesh.mgmt.api("GET", f"/api/peers/{a_id}")["flags"]
        if flags.get("enable_ssh_sftp") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert flags["enable_ssh_sftp"] is True and flags["allow_server_ssh"] is True
    persisted = json.loads((mesh.a.state_dir / "flags.json").read_text())
    assert persisted["flags"]["enable_ssh_sftp"] and persisted["management_url"] == mesh.mgmt.url


def test_down_stops_the_daemon_and_cleans_up(mesh: Mesh) -> None:
    pid = mesh.a.status()["pid"]
    res = mesh.a.cli("down")
    assert res.returncode == 0, res.stderr
    assert f"stopped meshsshd (pid {pid})" in res.stdout
    assert pid_gone(pid)
    st = mesh.a.status()
    assert st["state"] == "stopped" and st["pid"] is None
    assert not (mesh.a.state_dir / "meshsshd.pid").exists()
    assert not (mesh.a.state_dir / "dataplane.json").exists()
    again = mesh.a.cli("down")
    assert again.returncode == 0 and "not running" in again.stdout
    assert mesh.a.cli("status").returncode == 3


def test_state_dir_secrets_are_private(mesh: Mesh) -> None:
    for name in ("wireguard.key", "credential.json", "flags.json", "netmap.json", "ssh_host_ed25519_key"):
        path: Path = mesh.b.state_dir / name
        assert path.stat().st_mode & 0o077 == 0, name
    cred = json.loads((mesh.b.state_dir / "credential.json").read_text())["credential"]
    assert cred not in (mesh.b.state_dir / "status.json").read_text()
    for log in (mesh.b.output(), mesh.a.output()):
        assert cred not in log and mesh.setup_key not in log
