"""`meshsshd status` text, and `down`/`status` without a daemon (no root needed)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from click.testing import CliRunner

from meshsshd.cli import main
from meshsshd.cli_agent import human_status

DOC = {
    "running": True, "pid": 42, "state": "serving", "reason": "",
    "management_url": "http://mgmt:8080", "management": {"connected": False, "since": "2026-01-01T00:00:00Z",
                                                          "last_error": "connection refused"},
    "name": "db-1", "fqdn": "db-1.mesh.internal", "peer_id": "p1", "mesh_ip": "100.64.0.2",
    "network": "100.64.0.0/10", "netmap_serial": 12, "netmap_error": "",
    "dataplane": {"kind": "wireguard", "interface": "mesh0", "userspace": True, "table": "inet meshsshd"},
    "ssh": {"running": True, "listen": "100.64.0.2:22022", "flags": {"allow_server_ssh": True, "enable_ssh_sftp": False}},
    "peers": [{"name": "laptop", "mesh_ip": "100.64.0.3", "latest_handshake": time.time() - 30, "ssh_enabled": False}],
    "sessions": [{"local_user": "alice", "identity": "alice@example.com", "source": "100.64.0.3", "kind": "shell",
                  "pty": True}],
}


def test_human_status_names_everything_an_operator_asks_about() -> None:
    doc = {**DOC, "peers": [{**DOC["peers"][0], "latest_handshake": time.time() - 30}]}
    text = human_status(doc)
    assert "running (pid 42), serving" in text
    assert "http://mgmt:8080 (disconnected since 2026-01-01T00:00:00Z)" in text
    assert "last error: connection refused" in text
    assert "mesh0 (wireguard-go), nftables inet meshsshd" in text
    assert "serving on 100.64.0.2:22022; flags: allow_server_ssh" in text
    assert "laptop" in text and re.search(r"handshake 3[01]s ago", text)
    assert "alice ← alice@example.com from laptop (100.64.0.3): shell (pty)" in text


def test_human_status_without_the_sessions_file_shows_only_the_count() -> None:
    """A user running `meshsshd status` cannot read sessions.json (0600): no identities."""
    doc = {k: v for k, v in DOC.items() if k != "sessions"}
    text = human_status({**doc, "session_count": 2})
    assert "Sessions (2): who is logged in is shown to root only" in text
    assert "alice@example.com" not in text


def test_status_and_down_without_a_daemon(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert res.exit_code == 1 and "has not run" in res.output
    (tmp_path / "status.json").write_text(json.dumps({**DOC, "pid": 999999999}))
    res = runner.invoke(main, ["status", "--json", "--state-dir", str(tmp_path)])
    doc = json.loads(res.output)
    assert res.exit_code == 3 and doc["running"] is False and doc["state"] == "crashed"
    res = runner.invoke(main, ["down", "--state-dir", str(tmp_path)])
    assert res.exit_code == 0 and "not running" in res.output
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "stopped"
