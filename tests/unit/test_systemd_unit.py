"""deploy/meshsshd.service: systemd accepts it, and it keeps what the daemon needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import REPO, VENV_BIN, require_tool

UNIT = REPO / "deploy" / "meshsshd.service"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = tmp_path / "meshsshd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/meshsshd", str(VENV_BIN / "meshsshd")))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "meshsshd.service" not in res.stderr, res.stderr


def test_sandbox_keeps_what_sessions_and_the_data_plane_need() -> None:
    lines = {l.split("=", 1)[0]: l.split("=", 1)[1] for l in UNIT.read_text().splitlines()
             if "=" in l and not l.startswith("#")}
    assert lines["ProtectSystem"] == "strict" and lines["PrivateTmp"] == "yes"
    assert "ProtectHome" not in lines and "NoNewPrivileges" not in lines and "PrivateDevices" not in lines
    caps = set(lines["CapabilityBoundingSet"].split())
    assert {"CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL"} <= caps
    assert "CAP_SYS_ADMIN" not in caps
    assert "AF_NETLINK" in lines["RestrictAddressFamilies"]
    justified = " ".join(l for l in UNIT.read_text().splitlines() if l.startswith("#   CAP_")).split()
    assert caps <= set(justified), caps - set(justified)  # every capability has its reason
