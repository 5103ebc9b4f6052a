"""An admin drives meshmgmt from the command line: user, group, setup key, SSH policy."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
from pathlib import Path

import aiohttp

from tests.support import console_script, free_port, wait_for_port

from .mgmtkit import Mgmt, call, register_peer


async def test_admin_cli_end_to_end(sqlite_mgmt: Mgmt) -> None:
    mgmt = sqlite_mgmt
    out = mgmt.cli("users", "create", "alice@example.com", "--name", "Alice", "--password-stdin",
                   input="correct horse battery\n").stdout
    assert "alice@example.com" in out
    svc = json.loads(mgmt.cli("--json", "users", "create", "ci@example.com", "--service").stdout)
    assert svc["client_id"].startswith("svc-") and svc["client_secret"]

    mgmt.cli("groups", "create", "servers")
    mgmt.cli("groups", "create", "admins", "--user", "alice@example.com")
    key_out = mgmt.cli("setup-keys", "create", "--name", "servers", "--reusable", "--auto-group", "servers").stdout
    key = key_out.strip().splitlines()[-1].split(": ", 1)[1]
    assert key.startswith("mk_")
    mgmt.cli("policies", "create", "admins-ssh", "--source", "admins", "--destination", "servers",
             "--protocol", "ssh", "--local-user", "localpart", "--local-user", "deploy",
             "--accept-env", "LANG", "--accept-env", "GIT_*")

    async with aiohttp.ClientSession() as http:
        srv = await register_peer(http, mgmt, key, "db-1")
        laptop = await register_peer(http, mgmt, key, "laptop", allow_server_ssh=False)
        mgmt.cli("groups", "update", "servers", "--peer", "db-1")
        mgmt.cli("groups", "update", "admins", "--add-peer", "laptop")
        async with http.ws_connect(mgmt.url + "/api/peers/sync",
                                   headers={"Authorization": f"Peer {srv['peer_id']}:{srv['credential']}"}) as ws:
            netmap = (await ws.receive_json(timeout=5))["netmap"]
    assert netmap["ssh"]["enabled"]
    assert netmap["ssh"]["access"] == [{"sources": [laptop["mesh_ip"] + "/32"], "identities": ["alice@example.com"],
                                        "local_users": ["localpart", "deploy"], "accept_env": ["LANG", "GIT_*"]}]

    peers = json.loads(mgmt.cli("--json", "peers", "list").stdout)["peers"]
    assert {p["name"] for p in peers} == {"db-1", "laptop"}
    table = mgmt.cli("peers", "list").stdout
    assert "db-1" in table and srv["mesh_ip"] in table
    mgmt.cli("peers", "ssh", "db-1", "on")
    mgmt.cli("peers", "rename", "db-1", "db-one")
    peers = {p["name"]: p for p in json.loads(mgmt.cli("--json", "peers", "list").stdout)["peers"]}
    assert peers["db-one"]["ssh_enabled"] is True

    pols = json.loads(mgmt.cli("--json", "policies", "list").stdout)["policies"]
    assert pols[0]["name"] == "admins-ssh" and pols[0]["rules"][0]["protocol"] == "ssh"
    mgmt.cli("policies", "disable", "admins-ssh")
    assert json.loads(mgmt.cli("--json", "policies", "list").stdout)["policies"][0]["enabled"] is False

    events = json.loads(mgmt.cli("--json", "events", "list").stdout)["events"]
    assert {"peer.registered", "policy.created", "user.created"} <= {e["type"] for e in events}
    assert "peer.registered" in mgmt.cli("events", "list").stdout

    # --follow prints events as they arrive (from --since on, so starting it is not a race).
    last = events[-1]["id"]
    follow = subprocess.Popen([console_script("meshmgmt"), "--url", mgmt.url, "--token-file",
                               str(mgmt.data_dir / "admin.token"), "--json", "events", "list", "--follow",
                               "--since", str(last)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(mgmt.url + "/api/peers/events",
                                 headers={"Authorization": f"Peer {srv['peer_id']}:{srv['credential']}"},
                                 json={"events": [{"type": "exec", "command": "uptime", "identity": "alice@example.com"}]}
                                 ) as resp:
                assert resp.status == 202
        got = {"type": ""}
        while got["type"] != "exec":  # management's own events since `last` come first
            line = await asyncio.wait_for(asyncio.to_thread(follow.stdout.readline), 10)  # type: ignore[union-attr]
            got = json.loads(line)
        assert got["type"] == "exec" and got["command"] == "uptime" and got["peer_id"] == srv["peer_id"]
    finally:
        follow.terminate()
        follow.wait(10)

    # Errors: a clear message and exit 1; a missing token file is a usage error (2).
    bad = mgmt.cli("groups", "create", "admins", check=False)
    assert bad.returncode == 1 and "409" in bad.stderr and "exists" in bad.stderr
    res = subprocess.run([console_script("meshmgmt"), "--url", mgmt.url, "--token-file", "/nonexistent", "peers",
                          "list"], capture_output=True, text=True)
    assert res.returncode == 2 and "token file" in res.stderr
    mgmt.cli("peers", "delete", "laptop")
    mgmt.cli("setup-keys", "revoke", "servers")
    keys = json.loads(mgmt.cli("--json", "setup-keys", "list").stdout)["setup_keys"]
    assert keys[0]["revoked"] is True
    mgmt.cli("users", "block", "alice@example.com")
    users = {u["email"]: u for u in json.loads(mgmt.cli("--json", "users", "list").stdout)["users"]}
    assert users["alice@example.com"]["blocked"] is True
    assert users["alice@example.com"]["has_password"] is True

    # The other switch and delete commands: each confirms what it did, naming the object.
    assert mgmt.cli("users", "unblock", "alice@example.com").stdout == "unblocked alice@example.com\n"
    assert mgmt.cli("policies", "enable", "admins-ssh").stdout == "policy admins-ssh enabled\n"
    assert json.loads(mgmt.cli("--json", "policies", "list").stdout)["policies"][0]["enabled"] is True
    assert mgmt.cli("policies", "delete", "admins-ssh").stdout == "deleted policy admins-ssh\n"
    assert mgmt.cli("groups", "delete", "admins").stdout == "deleted group admins\n"
    assert mgmt.cli("users", "delete", "ci@example.com").stdout == "deleted user ci@example.com\n"
    users = {u["email"] for u in json.loads(mgmt.cli("--json", "users", "list").stdout)["users"]}
    groups = {g["name"] for g in json.loads(mgmt.cli("--json", "groups", "list").stdout)["groups"]}
    assert "ci@example.com" not in users and "alice@example.com" in users
    assert groups == {"servers"} and json.loads(mgmt.cli("--json", "policies", "list").stdout)["policies"] == []


async def test_peers_list_shows_the_effective_ssh_state_next_to_the_toggle(sqlite_mgmt: Mgmt) -> None:
    """The admin toggle is one input of several; the list says what the maps make of it
    (the token exchange's causes, management/idp/why_not.py), as words in the table and
    as code and reason, naming the fix, in --json."""
    mgmt = sqlite_mgmt

    def states() -> dict[str, dict]:
        return {p["name"]: p for p in json.loads(mgmt.cli("--json", "peers", "list").stdout)["peers"]}

    def row(name: str) -> str:
        return next(line for line in mgmt.cli("peers", "list").stdout.splitlines() if f" {name} " in line)

    mgmt.cli("groups", "create", "servers")
    mgmt.cli("groups", "create", "laptops")
    key = mgmt.cli("setup-keys", "create", "--reusable").stdout.strip().splitlines()[-1].split(": ", 1)[1]
    async with aiohttp.ClientSession() as http:
        await register_peer(http, mgmt, key, "web")
        await register_peer(http, mgmt, key, "laptop", allow_server_ssh=False)
    mgmt.cli("groups", "update", "servers", "--add-peer", "web")
    mgmt.cli("groups", "update", "laptops", "--add-peer", "laptop")

    peers = states()
    assert (peers["web"]["ssh_state"], peers["web"]["ssh_state_code"]) == ("no policy", "no-policy-for-peer")
    assert "meshmgmt policies create" in peers["web"]["ssh_state_reason"]
    assert (peers["laptop"]["ssh_state"], peers["laptop"]["ssh_state_code"]) == ("not served", "ssh-not-served")
    assert "--allow-server-ssh" in peers["laptop"]["ssh_state_reason"]

    mgmt.cli("policies", "create", "to-web", "--source", "laptops", "--destination", "servers", "--port", "22")
    web = states()["web"]
    assert (web["ssh_enabled"], web["ssh_state"], web["ssh_state_code"]) == (False, "toggle off", "ssh-toggle-off")
    assert "meshmgmt peers ssh web on" in web["ssh_state_reason"]
    assert " no " in row("web") and "toggle off" in row("web")

    out = mgmt.cli("peers", "ssh", "web", "on").stdout
    assert out.strip() == "SSH on for web; effective: serving", out
    web = states()["web"]
    assert (web["ssh_enabled"], web["ssh_state"], web["ssh_state_code"], web["ssh_state_reason"]) == (
        True, "serving", "serving", "")
    assert " yes " in row("web") and "serving" in row("web")

    mgmt.cli("policies", "disable", "to-web")
    web = states()["web"]
    assert (web["ssh_enabled"], web["ssh_state"]) == (True, "policy disabled")
    assert "meshmgmt policies enable to-web" in web["ssh_state_reason"]
    _, doc = await _get(mgmt, "/api/peers/web")
    assert doc["ssh_state"] == "policy disabled"


async def test_a_peer_named_like_another_peers_id_cannot_stand_in_for_it(sqlite_mgmt: Mgmt) -> None:
    """Issue 11 item 11: admin commands take an id or a name; an id means that peer."""
    mgmt = sqlite_mgmt
    key = json.loads(mgmt.cli("--json", "setup-keys", "create", "--reusable").stdout)["key"]
    async with aiohttp.ClientSession() as http:
        victim = await register_peer(http, mgmt, key, "victim")
        impostor = await register_peer(http, mgmt, key, victim["peer_id"])
        spare = await register_peer(http, mgmt, key, "spare")
    assert impostor["name"] == f"peer-{victim['peer_id']}"  # id-shaped names are reserved
    res = mgmt.cli("peers", "rename", "spare", spare["peer_id"][::-1], check=False)
    assert res.returncode != 0 and "peer id" in res.stderr
    # A database from before the reservation may hold such a name: ids still win.
    with sqlite3.connect(mgmt.data_dir / "meshmgmt.db") as db:
        db.execute("UPDATE peers SET name = ? WHERE id = ?", (victim["peer_id"], impostor["peer_id"]))
    _, doc = await _get(mgmt, f"/api/peers/{victim['peer_id']}")
    assert doc["id"] == victim["peer_id"]
    mgmt.cli("groups", "create", "pair", "--peer", victim["peer_id"])
    group = next(g for g in json.loads(mgmt.cli("--json", "groups", "list").stdout)["groups"] if g["name"] == "pair")
    assert group["peers"] == [victim["peer_id"]]
    out = mgmt.cli("peers", "delete", victim["peer_id"]).stdout
    assert "deleted peer victim" in out
    left = {p["id"] for p in json.loads(mgmt.cli("--json", "peers", "list").stdout)["peers"]}
    assert victim["peer_id"] not in left and impostor["peer_id"] in left
    out = mgmt.cli("peers", "approve-rekey", "spare", "--expires-in", "120").stdout
    assert out.startswith("spare may register again until ")


async def _get(mgmt: Mgmt, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        return await call(http, "GET", mgmt.url + path, headers=mgmt.admin, expect=200)


def test_init_refuses_twice_and_protects_the_token(tmp_path: Path) -> None:
    data = tmp_path / "d"
    meshmgmt = console_script("meshmgmt")
    first = subprocess.run([meshmgmt, "init", "--data-dir", str(data), "--admin-email", "root@example.com"],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    token_file = data / "admin.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert (data / "meshmgmt.db").stat().st_mode & 0o077 == 0
    token = token_file.read_text().strip()
    again = subprocess.run([meshmgmt, "init", "--data-dir", str(data), "--admin-email", "root@example.com"],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "already initialised" in again.stderr
    # already initialised is the answer, whatever the password would have been
    again = subprocess.run([meshmgmt, "init", "--data-dir", str(data), "--admin-email", "root@example.com",
                            "--admin-password-stdin"], input="short\n", capture_output=True, text=True)
    assert again.returncode == 1 and "already initialised" in again.stderr, again.stderr
    assert "8 characters" not in again.stderr
    assert token_file.read_text().strip() == token
    # Only the digest is stored.
    assert token.encode() not in (data / "meshmgmt.db").read_bytes()
    bad = subprocess.run([meshmgmt, "init", "--data-dir", str(tmp_path / "e"), "--admin-email", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "email" in bad.stderr
    short = subprocess.run([meshmgmt, "init", "--data-dir", str(tmp_path / "f"), "--admin-email", "a@b.c",
                            "--admin-password-stdin"], input="short\n", capture_output=True, text=True)
    assert short.returncode == 1 and "8 characters" in short.stderr


def test_serve_refuses_uninitialised_store(tmp_path: Path) -> None:
    res = subprocess.run([console_script("meshmgmt"), "serve", "--data-dir", str(tmp_path), "--listen",
                          "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "meshmgmt init" in res.stderr
    assert list(tmp_path.iterdir()) == []   # no database was made in passing
    typo = tmp_path / "typo"
    res = subprocess.run([console_script("meshmgmt"), "serve", "--data-dir", str(typo), "--listen",
                          "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and f"{typo}: no such directory" in res.stderr and "meshmgmt init" in res.stderr
    assert not typo.exists()
    res = subprocess.run([console_script("meshmgmt"), "serve", "--data-dir", str(tmp_path), "--network", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--network" in res.stderr


def test_serve_logs_start_and_stop_as_one_json_line_each(tmp_path: Path) -> None:
    """What an operator sees in the journal: JSON lines only, no dozen Alembic lines at
    start, a listening line, and the stop with the signal that caused it."""
    data = tmp_path / "d"
    meshmgmt = console_script("meshmgmt")
    assert subprocess.run([meshmgmt, "init", "--data-dir", str(data), "--admin-email", "root@example.com"],
                          capture_output=True).returncode == 0
    port = free_port()
    proc = subprocess.Popen([meshmgmt, "serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    lines = [json.loads(line) for line in out.splitlines()]   # every line is JSON
    assert not [doc for doc in lines if doc.get("logger", "").startswith("alembic")], out
    events = [doc.get("event") for doc in lines]
    assert events.count("mgmt.listening") == 1 and events[-2:] == ["mgmt.stopping", "mgmt.stopped"], events
    assert lines[-2]["signal"] == "SIGTERM"
