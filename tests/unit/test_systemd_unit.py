"""deploy/*.service: systemd accepts both units, and each is sandboxed to what its program needs.

meshsshd.service keeps the capabilities sessions and the data plane need; meshmgmt.service
runs `meshmgmt serve` unprivileged. One module so that both units are checked the same way.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from meshsshd import local_peers
from meshsshd.config import DEFAULT_STATE_DIR
from meshsshd.session import _agent_helper, _utmp
from tests.support import REPO, VENV_BIN, os_user, require_root, require_tool

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


def _all_values(unit: Path, key: str) -> list[str]:
    """Every space-separated value of a key that may repeat (ReadWritePaths=)."""
    return [
        value
        for line in unit.read_text().splitlines()
        if line.startswith(f"{key}=")
        for value in line.split("=", 1)[1].split()
    ]


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
    assert lines["ProtectSystem"] == "strict"
    for kept_off in ("ProtectHome", "PrivateTmp", "NoNewPrivileges", "PrivateDevices", "ProtectClock"):
        assert kept_off not in lines, kept_off
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


def test_meshsshd_may_write_every_path_the_daemon_and_its_sessions_write() -> None:
    """ProtectSystem=strict makes all else read-only, and writes there fail quietly (a
    missing login record, a pointer the client never finds): each path the code writes
    must be under a ReadWritePaths=, RuntimeDirectory= or StateDirectory= of the unit."""
    writable = [p.lstrip("-") for p in _all_values(MESHSSHD_UNIT, "ReadWritePaths")]
    writable += [f"/run/{d}" for d in _all_values(MESHSSHD_UNIT, "RuntimeDirectory")]
    writable += [f"/var/lib/{d}" for d in _all_values(MESHSSHD_UNIT, "StateDirectory")]
    written = {
        "utmp": _utmp.UTMP_FILE,
        "wtmp": _utmp.WTMP_FILE,
        "local peer pointers": str(local_peers.ROOT_POINTERS),
        "state dir": str(DEFAULT_STATE_DIR),
        "agent sockets": _agent_helper.BASE,
    }
    for what, path in written.items():
        path = re.sub(r"^/var/run/", "/run/", path)  # a symlink to /run; systemd wants the real path
        assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), (what, path)


def _capability_xattr(cap: int) -> bytes:
    """`security.capability` v2 for `setcap CAP+ep` (VFS_CAP_REVISION_2 | effective)."""
    return struct.pack("<IIIII", 0x02000001, 1 << cap, 0, 0, 0)


def test_meshsshd_sessions_can_run_ping_under_its_bounding_set(tmp_path: Path) -> None:
    """Debian's ping is `cap_net_raw+ep`. A program whose file capabilities the bounding set
    cannot grant is not started at all (EPERM from execve), for any user: the session's user
    runs a copy of `true` marked like ping under the unit's exact bounding set."""
    require_root()
    setpriv = require_tool("setpriv")
    caps = _directives(MESHSSHD_UNIT)["CapabilityBoundingSet"].split()
    bounding = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])
    tmp_path.chmod(0o755)
    ping_like = tmp_path / "ping-like"
    ping_like.write_bytes(Path("/bin/true").read_bytes())
    ping_like.chmod(0o755)
    os.setxattr(ping_like, "security.capability", _capability_xattr(13))  # CAP_NET_RAW
    with os_user("mcap") as user:
        res = subprocess.run(
            [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
             f"--bounding-set={bounding}", str(ping_like)],
            capture_output=True, text=True,
        )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("unit", [MESHSSHD_UNIT, MESHMGMT_UNIT], ids=lambda u: u.name)
def test_exposure_score_stays_at_most_the_one_recorded_in_the_unit(unit: Path) -> None:
    """A ratchet: the unit's `# exposure: N` comment is the measured score; a change that
    raises it fails here, one that lowers it should lower the comment too."""
    analyze = require_tool("systemd-analyze")
    recorded = re.search(r"^# exposure: (\d+\.\d)$", unit.read_text(), re.MULTILINE)
    assert recorded, f"{unit.name} has no '# exposure: N.N' line"
    res = subprocess.run([analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    measured = re.search(r"Overall exposure level for \S+: (\d+\.\d)", res.stdout + res.stderr)
    assert measured, res.stdout + res.stderr
    assert float(measured.group(1)) <= float(recorded.group(1)), (measured.group(1), recorded.group(1))
