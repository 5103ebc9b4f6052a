"""scripts/install-service.sh, run for real into a temporary root (`--root`).

It builds the wheel from this checkout, makes the venv, links the commands and man pages
and places the units, config and PAM file, exactly as on a server, only below the temp
root. One install serves the module (it takes ~25 s); tests that change the tree use their
own root or restore what they changed.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO, require_root, require_tool

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SCRIPT = REPO / "scripts" / "install-service.sh"
UNITS = ("meshsshd.service", "meshmgmt.service")
COMMANDS = ("meshsshd", "meshmgmt", "meshssh")


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    root = tmp_path_factory.mktemp("root")
    res = _install(root)
    assert res.returncode == 0, res.stdout + res.stderr
    return root


def _tree(root: Path) -> dict[str, tuple]:
    """Everything an install can change, per path: type and mode, owner, size, mtime, link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, target)
    return out


def test_install_puts_each_file_in_place_with_its_mode(installed: Path) -> None:
    for cmd in COMMANDS:
        link = installed / "usr/local/bin" / cmd
        assert os.readlink(link) == f"../../../opt/meshsshd/bin/{cmd}"
        assert os.access(link, os.X_OK), link
    version = subprocess.run([installed / "usr/local/bin/meshsshd", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("meshsshd "), version
    pages = {p.name for p in (installed / "usr/local/share/man/man1").iterdir()}
    assert pages == {p.name for p in (REPO / "deploy/man/man1").glob("*.1")}
    placed = {
        **{f"usr/local/lib/systemd/system/{u}": REPO / "deploy" / u for u in UNITS},
        "etc/meshsshd/meshsshd.toml": REPO / "deploy/meshsshd.example.toml",
        "etc/pam.d/meshsshd": REPO / "deploy/pam.d/meshsshd",
    }
    for rel, source in placed.items():
        st = (installed / rel).lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644, rel
        assert (st.st_uid, st.st_gid) == (0, 0), rel
        assert (installed / rel).read_bytes() == source.read_bytes(), rel
    for rel in ("opt/meshsshd", "etc/meshsshd", "usr/local/bin"):
        assert stat.S_IMODE((installed / rel).stat().st_mode) == 0o755, rel


def test_second_run_changes_nothing_and_keeps_an_edited_config(installed: Path) -> None:
    config = installed / "etc/meshsshd/meshsshd.toml"
    original = config.read_text()
    edited = original.replace('listen = ["127.0.0.1:22022"]', 'listen = ["0.0.0.0:22022"]')
    assert edited != original
    config.write_text(edited)
    try:
        before = _tree(installed)
        res = _install(installed)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _tree(installed) == before
        assert config.read_text() == edited
        assert f"config: {config} kept as it is" in res.stdout, res.stdout
        assert re.search(r"package: \S+\.whl unchanged in ", res.stdout), res.stdout
        assert " installed" not in res.stdout and "created" not in res.stdout, res.stdout
    finally:
        config.write_text(original)


def test_systemd_accepts_the_installed_units(installed: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify --root` wants a whole OS below the root (sysinit.target,
    /bin/mkdir), so the installed units are verified on this host with their /usr/local
    paths pointed into the temp root: the installed commands must run, their man pages exist."""
    analyze = require_tool("systemd-analyze")
    for unit in UNITS:
        text = (installed / "usr/local/lib/systemd/system" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/", f"{installed}/usr/local/bin/"))
    env = {**os.environ, "MANPATH": f"{installed / 'usr/local/share/man'}:"}
    res = subprocess.run([analyze, "verify", *(str(tmp_path / u) for u in UNITS)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    for unit in UNITS:
        assert unit not in res.stderr, res.stderr


def test_refuses_a_venv_that_others_may_write(tmp_path: Path) -> None:
    require_root()
    venv = tmp_path / "opt/meshsshd"
    venv.mkdir(parents=True)
    venv.chmod(0o777)
    res = _install(tmp_path)
    assert res.returncode == 1
    assert f"{venv} is writable by group or others (mode 777): chmod go-w {venv}" in res.stderr, res.stderr
    assert not (venv / "bin").exists()


def test_an_upgrade_drops_links_to_man_pages_the_package_no_longer_has(installed: Path) -> None:
    man = installed / "usr/local/share/man/man1"
    gone = man / "meshsshd-retired.1"
    gone.symlink_to("../../../../../opt/meshsshd/share/man/man1/meshsshd-retired.1")
    theirs = man / "other-tool.1"
    theirs.symlink_to("/nonexistent/other-tool.1")  # not ours: left alone
    try:
        res = _install(installed)
        assert res.returncode == 0, res.stdout + res.stderr
        assert not gone.is_symlink() and theirs.is_symlink()
        assert "0 of them new, 1 stale removed" in res.stdout, res.stdout
    finally:
        theirs.unlink()


def test_enable_with_a_root_enables_only_the_unit_asked_for(installed: Path) -> None:
    require_tool("systemctl")
    res = _install(installed, "--enable", "meshsshd")
    assert res.returncode == 0, res.stdout + res.stderr
    wants = installed / "etc/systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "meshsshd.service") == "/usr/local/lib/systemd/system/meshsshd.service"
    assert not (wants / "meshmgmt.service").exists()
    assert "systemd: meshsshd enabled" in res.stdout, res.stdout


def test_a_unit_copy_in_etc_that_shadows_ours_is_named(installed: Path) -> None:
    copy = installed / "etc/systemd/system/meshmgmt.service"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text("[Service]\nExecStart=/bin/true\n")
    try:
        res = _install(installed)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"unit: note: {copy} overrides /usr/local/lib/systemd/system/meshmgmt.service" in res.stdout, res.stdout
        assert "meshsshd.service overrides" not in res.stdout
    finally:
        copy.unlink()
