"""Issue 13: the wheel installs its packages under names that are ours. Built from this tree,
installed into a clean venv beside packages named `client` and `management` (which the wheel
once overwrote), the three commands run sub-commands that import deep modules, and the other
packages are left as they were."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow

# Whatever else a user has installed under these names; importing one of them fails loudly.
DUMMIES = ("client", "management")
DUMMY_INIT = 'raise ImportError("the user\'s own {name} package, not meshsshd\'s")\n'


def _run(argv: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd, **kw)


def _files(site: Path) -> dict[Path, bytes]:
    return {p.relative_to(site): p.read_bytes() for name in DUMMIES for p in (site / name).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the files git sees: setuptools packs whatever an earlier build
    left in build/lib (a developer's tree still has client/ and management/ there)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    listed = _run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    for rel in listed.stdout.splitlines():
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)], cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    (built,) = out.glob("meshsshd-*.whl")
    return built


def test_the_wheel_has_only_our_top_level_packages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("meshsshd-")}
    assert tops == {"meshsshd", "meshssh_client", "meshmgmt"}, tops
    # the migrations and their template are data Alembic reads at `meshmgmt init`
    assert "meshmgmt/migrations/script.py.mako" in names
    assert "meshmgmt/migrations/versions/0001_initial.py" in names


def test_the_commands_work_beside_packages_named_client_and_management(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp_path).stdout.strip())
    for name in DUMMIES:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(DUMMY_INIT.format(name=name))
    before = _files(site)

    r = _run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    bin_ = env_dir / "bin"
    for command in ("meshssh", "meshsshd", "meshmgmt"):
        r = _run([str(bin_ / command), "--version"], cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.startswith(f"{command} "), (command, r.stdout, r.stderr)

    # deep imports: the store, Alembic's migrations shipped as package data, the issuer
    data = tmp_path / "mgmt"
    r = _run([str(bin_ / "meshmgmt"), "init", "--data-dir", str(data), "--admin-email", "root@example.com"],
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (data / "admin.token").exists() and (data / "meshmgmt.db").exists()
    # the config schema
    bad = tmp_path / "bad.toml"
    bad.write_text("bogus = 1\n")
    r = _run([str(bin_ / "meshsshd"), "serve", "--config", str(bad)], cwd=tmp_path)
    assert r.returncode == 2 and "unknown key `bogus`" in r.stderr, r.stderr
    # the full client CLI behind the light front
    r = _run([str(bin_ / "meshssh"), "config", "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "install" in r.stdout, r.stderr

    assert _files(site) == before, "installing the wheel changed the user's client/management packages"
    for name in DUMMIES:
        r = _run([str(python), "-c", f"import {name}"], cwd=tmp_path)
        assert f"the user's own {name} package" in r.stderr, r.stderr
