"""deploy/*.service: systemd accepts both units, and each is sandboxed to what its program needs.

meshsshd.service keeps the capabilities sessions and the data plane need; meshmgmt.service
runs `meshmgmt serve` unprivileged. One module so that both units are checked the same way.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO, VENV_BIN, require_tool

MESHSSHD_UNIT = REPO / "deploy" / "meshsshd.service"
MESHMGMT_UNIT = REPO / "deploy" / "meshmgmt.service"


def _directives(unit: Path) -> dict[str, str]:
    """`Key=value` lines of a unit, first value of a repeated key (none that the tests read repeats)."""
    out: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, value)
    return out


@pytest.mark.parametrize("program", ["meshsshd", "meshmgmt"])
def test_systemd_accepts_the_unit(tmp_path: Path, program: str) -> None:
    analyze = require_tool("systemd-analyze")
    unit = tmp_path / f"{program}.service"
    text = (REPO / "deploy" / f"{program}.service").read_text()
    unit.write_text(text.replace(f"/usr/local/bin/{program}", str(VENV_BIN / program)))
    # verify looks up the Documentation= man pages: ours, as the package installs them
    env = {**os.environ, "MANPATH": f"{REPO / 'deploy' / 'man'}:"}
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert f"{program}.service" not in res.stderr, res.stderr


def test_meshsshd_sandbox_keeps_what_sessions_and_the_data_plane_need() -> None:
    lines = _directives(MESHSSHD_UNIT)
    assert lines["ProtectSystem"] == "strict" and lines["PrivateTmp"] == "yes"
    assert "ProtectHome" not in lines and "NoNewPrivileges" not in lines and "PrivateDevices" not in lines
    caps = set(lines["CapabilityBoundingSet"].split())
    assert {"CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL"} <= caps
    assert "CAP_SYS_ADMIN" not in caps
    assert "AF_NETLINK" in lines["RestrictAddressFamilies"]
    justified = " ".join(l for l in MESHSSHD_UNIT.read_text().splitlines() if l.startswith("#   CAP_")).split()
    assert caps <= set(justified), caps - set(justified)  # every capability has its reason


def test_meshmgmt_unit_runs_serve_unprivileged() -> None:
    lines = _directives(MESHMGMT_UNIT)
    assert " serve --data-dir /var/lib/meshmgmt " in lines["ExecStart"]
    assert lines["User"] == "meshmgmt" and lines["NoNewPrivileges"] == "yes"
    assert lines["CapabilityBoundingSet"] == "" and lines["ProtectSystem"] == "strict"
    assert lines["UMask"] == "0077" and lines["StateDirectoryMode"] == "0700"
