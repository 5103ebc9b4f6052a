"""Subsystems configured from management, reached with `meshssh -s` and native `ssh -s`.

pwsh cannot be installed here, so the subsystem is a small stand-in speaking a line
protocol over stdin/stdout (as `pwsh -sshs` speaks PSRP): it greets with the user it
runs as, then answers every line. It is set with `meshmgmt peers subsystem set`
(per peer) and `meshmgmt groups subsystem set` (per group), reaches the peer in its
network map, and the audit log on management records each use.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.meshkit import Mesh
from tests.support import console_script, require, require_root, require_tool

pytestmark = [pytest.mark.root, pytest.mark.openssh]

ALICE = ("alice@example.com", "alice-password-1")
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter may not be executable by the test user
STANDIN = (
    "import os, pwd, sys\n"
    "tag = sys.argv[1]\n"
    "print('READY', tag, pwd.getpwuid(os.getuid()).pw_name, flush=True)\n"
    "for line in sys.stdin:\n"
    "    print('OK', line.strip()[::-1], flush=True)\n"
    "print('BYE', flush=True)\n"
)


class World:
    def __init__(self, mesh: Mesh, cfg: Path, user: str, script: Path) -> None:
        self.mesh = mesh
        self.cfg = cfg
        self.user = user
        self.script = script

    def mgmt(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([console_script("meshmgmt"), "--url", self.mesh.url, "--token-file",
                               str(self.mesh.token_file), *args], capture_output=True, text=True, timeout=30)

    def command(self, tag: str) -> str:
        return f"{SYSTEM_PYTHON} -u {self.script} {tag}"

    def subsystem(self, name: str, data: bytes = b"hello\nworld\n") -> subprocess.CompletedProcess:
        return self.mesh.meshssh(self.cfg, "-s", "-l", self.user, "win-1", name, input=data, timeout=30)

    def wait_served(self, name: str, tag: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
        """The map reaches the peer asynchronously: retry until the subsystem answers as tagged."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.subsystem(name)
            if r.returncode == 0 and r.stdout.startswith(f"READY {tag} ".encode()):
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not served as {tag}: {r.returncode} {r.stdout!r} {r.stderr!r}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, session_user) -> Iterator[World]:
    require_root()
    require(Path(SYSTEM_PYTHON).exists(), f"needs {SYSTEM_PYTHON} for the stand-in subsystem")
    tmp = tmp_path_factory.mktemp("subsys")
    # The stand-in runs as the test user, who cannot read pytest's 0700 tmp dirs.
    script_dir = Path(tempfile.mkdtemp(prefix="subsys-"))
    mesh = Mesh(tmp).start()
    try:
        script_dir.chmod(0o755)
        script = script_dir / "standin.py"
        script.write_text(STANDIN)
        script.chmod(0o644)
        mesh.add_user(*ALICE)
        for g, users in (("devs", [ALICE[0]]), ("laptops", []), ("windows", [])):
            mesh.add_group(g, users)
        mesh.add_ssh_policy("devs-ssh", ["devs", "laptops"], ["windows"])
        mesh.add_peer("win-1", mesh.setup_key("windows"), "--allow-server-ssh", wait=None)
        mesh.add_peer("laptop", mesh.setup_key("laptops"), wait=None)
        mesh.wait_status("win-1", "serving")
        mesh.wait_status("laptop", None)
        yield World(mesh, mesh.login(*ALICE), session_user.pw_name, script)
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()
        shutil.rmtree(script_dir, ignore_errors=True)


def _events(mesh: Mesh, etype: str) -> list[dict]:
    out, since = [], 0
    while True:
        page = mesh.api("GET", f"/api/events?since={since}&limit=1000")
        out += [e for e in page["events"] if e["type"] == etype]
        if not page["events"]:
            return out
        since = page["next"]


def test_peer_subsystem_round_trip_and_audit(world: World) -> None:
    r = world.mgmt("peers", "subsystem", "set", "win-1", "echoes", world.command("peer"))
    assert r.returncode == 0, r.stderr
    got = world.wait_served("echoes", "peer")
    assert got.stdout == f"READY peer {world.user}\nOK olleh\nOK dlrow\nBYE\n".encode()
    listed = world.mgmt("--json", "peers", "subsystem", "list", "win-1")
    assert '"name": "echoes"' in listed.stdout
    peer_id = world.mesh.status("win-1")["peer_id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        evs = [e for e in _events(world.mesh, "subsystem") if e.get("subsystem") == "echoes"]
        if evs:
            break
        time.sleep(0.3)
    assert evs and evs[0]["peer_id"] == peer_id and evs[0]["identity"] == ALICE[0]
    assert evs[0]["local_user"] == world.user
    assert any(e.get("name") == "echoes" for e in _events(world.mesh, "subsystem.set"))


def test_group_subsystem_and_peer_override(world: World) -> None:
    r = world.mgmt("groups", "subsystem", "set", "windows", "grouped", world.command("group"))
    assert r.returncode == 0, r.stderr
    world.wait_served("grouped", "group")
    assert world.mgmt("peers", "subsystem", "set", "win-1", "grouped", world.command("override")).returncode == 0
    world.wait_served("grouped", "override")
    assert world.mgmt("peers", "subsystem", "unset", "win-1", "grouped").returncode == 0
    world.wait_served("grouped", "group")


def test_unset_subsystem_is_refused(world: World) -> None:
    assert world.mgmt("peers", "subsystem", "set", "win-1", "gone", world.command("gone")).returncode == 0
    world.wait_served("gone", "gone")
    assert world.mgmt("peers", "subsystem", "unset", "win-1", "gone").returncode == 0
    deadline = time.monotonic() + 20
    while True:
        r = world.subsystem("gone")
        if r.returncode != 0:
            break
        assert time.monotonic() < deadline, "subsystem still served after unset"
        time.sleep(0.3)
    assert r.returncode == 255 and b"refused" in r.stderr, r.stderr
    assert b"READY" not in r.stdout


def test_native_ssh_s_through_the_dropin(world: World, tmp_path: Path) -> None:
    require_tool("ssh")
    assert world.mgmt("peers", "subsystem", "set", "win-1", "native", world.command("native")).returncode == 0
    world.wait_served("native", "native")
    r = world.mesh.meshssh(world.cfg, "config", "install", "--path", str(tmp_path / "drop"))
    assert r.returncode == 0, r.stderr
    conf = tmp_path / "ssh_config"
    conf.write_text(f"Include {tmp_path / 'drop' / '99-meshssh.conf'}\n")
    env = world.mesh.client_env(world.cfg)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    r = subprocess.run([require_tool("ssh"), "-F", str(conf), "-s", f"{world.user}@win-1", "native"],
                       input=b"abc\n", capture_output=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"READY native {world.user}\nOK cba\nBYE\n".encode()
