"""deploy/meshmgmt.service: systemd accepts it, and it runs `meshmgmt serve` sandboxed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import REPO, VENV_BIN, require_tool

UNIT = REPO / "deploy" / "meshmgmt.service"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = tmp_path / "meshmgmt.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/meshmgmt", str(VENV_BIN / "meshmgmt")))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "meshmgmt.service" not in res.stderr, res.stderr


def test_unit_runs_serve_unprivileged() -> None:
    lines = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            lines.setdefault(key, value)
    assert " serve --data-dir /var/lib/meshmgmt " in lines["ExecStart"]
    assert lines["User"] == "meshmgmt" and lines["NoNewPrivileges"] == "yes"
    assert lines["CapabilityBoundingSet"] == "" and lines["ProtectSystem"] == "strict"
    assert lines["UMask"] == "0077" and lines["StateDirectoryMode"] == "0700"
