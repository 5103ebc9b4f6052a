"""The control master (client/mux_master.py) with a real mesh: `meshssh host cmd` and
`ssh` through the drop-in run in the resident master on pooled logins.

Reuse is checked in the peer's log (one `auth.accepted` per login), never by timing.
Every master started here is stopped by the fixture (`Mesh.stop_masters`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.meshkit import Mesh
from tests.integration.test_client_e2e import _interactive
from tests.support import console_script, require_root, require_tool

pytestmark = [pytest.mark.root, pytest.mark.openssh]

ALICE = ("alice@example.com", "alice-password-1")
BOB = ("bob@example.com", "bob-password-12")


class World:
    def __init__(self, mesh: Mesh, user: str, alice: Path, bob: Path) -> None:
        self.mesh = mesh
        self.user = user
        self.alice = alice
        self.bob = bob

    def ms(self, *args: str, cfg: Path | None = None, **kw) -> subprocess.CompletedProcess:
        return self.mesh.meshssh(cfg or self.alice, *args, **kw)

    def logins(self, identity: str = ALICE[0]) -> int:
        """How many times db-1 accepted a login of `identity`."""
        out = self.mesh.peers["db-1"].output()
        return sum(1 for line in out.splitlines()
                   if '"auth.accepted"' in line and identity in line)

    def status(self, cfg: Path | None = None) -> dict | None:
        r = self.ms("control", "status", cfg=cfg)
        if r.returncode != 0:
            return None
        text = r.stdout.decode()
        pid = int(text.split("(pid ", 1)[1].split(")", 1)[0])
        served = int(text.split("sessions served: ", 1)[1].split(",", 1)[0])
        return {"pid": pid, "served": served}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, session_user) -> Iterator[World]:
    require_root()
    require_tool("ssh")
    mesh = Mesh(tmp_path_factory.mktemp("mesh")).start()
    try:
        for email, pw in (ALICE, BOB):
            mesh.add_user(email, pw)
        for g, users in (("devs", [ALICE[0], BOB[0]]), ("ops", []), ("servers", []), ("laptops", []),
                         ("ops-servers", [])):
            mesh.add_group(g, users)
        mesh.add_ssh_policy("devs-ssh", ["devs", "laptops"], ["servers"])
        mesh.add_ssh_policy("ops-ssh", ["ops", "laptops"], ["ops-servers"])  # nobody of ours
        mesh.add_peer("db-1", mesh.setup_key("servers"), "--allow-server-ssh", wait=None)
        mesh.add_peer("web-1", mesh.setup_key("ops-servers"), "--allow-server-ssh", wait=None)
        mesh.add_peer("laptop", mesh.setup_key("laptops"), wait=None)
        for name in ("db-1", "web-1"):
            mesh.wait_status(name, "serving")
        mesh.wait_status("laptop", None)
        w = World(mesh, session_user.pw_name, mesh.login(*ALICE), mesh.login(*BOB))
        yield w
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()


@pytest.fixture
def fresh(world: World) -> Iterator[World]:
    """No master before the test; none left after it."""
    world.ms("control", "stop")
    yield world
    world.mesh.stop_masters()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_second_call_reuses_the_login(fresh: World) -> None:
    w = fresh
    before = w.logins()
    r = w.ms(f"{w.user}@db-1", "echo one")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"one\n", b"")
    st = w.status()
    assert st is not None and st["served"] == 1  # the master ran it
    assert w.logins() == before + 1
    for n in (2, 3):
        r = w.ms(f"{w.user}@db-1", f"echo {n}")
        assert (r.returncode, r.stdout) == (0, f"{n}\n".encode()), r.stderr
    assert w.logins() == before + 1  # one login served all three
    assert w.status()["served"] == 3
    sock = w.alice / "control.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    assert w.alice.stat().st_mode & 0o777 == 0o700


def test_exit_codes_and_streams(fresh: World) -> None:
    w = fresh
    data = os.urandom(1024 * 1024)
    r = w.ms(f"{w.user}@db-1", "cat; printf 'to stderr' >&2; exit 7", input=data)
    assert r.returncode == 7, r.stderr
    assert r.stdout == data and r.stderr == b"to stderr"
    r = w.ms(f"{w.user}@db-1", "kill -TERM $$")
    assert r.returncode == 255
    r = w.ms("-n", f"{w.user}@db-1", "cat")  # -n: stdin is /dev/null, cat ends at once
    assert r.returncode == 0 and r.stdout == b""
    assert w.status()["served"] == 3


@pytest.mark.parametrize("control", ["yes", "no"])
def test_stdin_devnull_is_end_of_file(fresh: World, control: str) -> None:
    """`meshssh host cat < /dev/null` ends at once, in the master and in-process (epoll
    cannot watch /dev/null; it used to hang until the timeout)."""
    r = subprocess.run([console_script("meshssh"), f"{fresh.user}@db-1", "cat; echo done"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                       env=fresh.mesh.client_env(fresh.alice, MESHSSH_CONTROL=control))
    assert (r.returncode, r.stdout) == (0, b"done\n"), r.stderr


@pytest.mark.parametrize("argv", [
    pytest.param(["{user}@web-1", "true"], id="no-policy"),
    pytest.param(["{user}@nosuchpeer", "true"], id="unknown-peer"),
])
def test_refusals_say_the_same_as_in_process(fresh: World, argv: list[str]) -> None:
    w = fresh
    argv = [a.format(user=w.user) for a in argv]
    via_master = w.ms(*argv)
    in_process = w.ms(*argv, MESHSSH_CONTROL="no")
    assert via_master.returncode == in_process.returncode == 255
    assert via_master.stderr == in_process.stderr and via_master.stderr.startswith(b"meshssh: ")
    assert w.status()["served"] == 1  # the first went through the master, the second did not


def test_pty_through_the_master(fresh: World) -> None:
    """A login shell in a real terminal: size, resize (SIGWINCH → message), exit code,
    and the terminal's settings restored by the front."""
    env = fresh.mesh.client_env(fresh.alice, TERM="xterm")
    _interactive([console_script("meshssh"), f"{fresh.user}@db-1"], env)
    assert fresh.status()["served"] == 1


def test_disabled_runs_in_process(fresh: World) -> None:
    r = fresh.ms(f"{fresh.user}@db-1", "echo plain", MESHSSH_CONTROL="no")
    assert (r.returncode, r.stdout) == (0, b"plain\n"), r.stderr
    assert fresh.status() is None  # nothing started one


def test_other_options_run_in_process(fresh: World) -> None:
    r = fresh.ms("-o", "ConnectTimeout=20", f"{fresh.user}@db-1", "echo opt")
    assert (r.returncode, r.stdout) == (0, b"opt\n"), r.stderr
    assert fresh.status() is None


def test_killed_front_ends_the_remote_session(fresh: World, tmp_path: Path) -> None:
    w = fresh
    marker = f"/tmp/meshssh-ctl-{os.getpid()}"
    env = w.mesh.client_env(w.alice)
    p = subprocess.Popen([console_script("meshssh"), f"{w.user}@db-1",
                          f"echo $$ > {marker}; echo started; sleep 60"], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"started\n"
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 255
        remote_pid = int(Path(marker).read_text())
        assert wait_gone(remote_pid), "the remote command outlived the front"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        Path(marker).unlink(missing_ok=True)


def test_other_uid_is_refused(fresh: World, session_user) -> None:
    """The socket is 0600 in a 0700 directory; even where those were loosened, the
    master answers nobody but its own uid (SO_PEERCRED)."""
    w = fresh
    assert w.ms(f"{w.user}@db-1", "true").returncode == 0
    sock = w.alice / "control.sock"
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.fail("no system python3 for the other user")
    mode = w.alice.stat().st_mode & 0o777
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect('control.sock')\nexcept OSError as e:\n print('connect', e.errno); sys.exit()\n"
             "try:\n s.sendall(b'{\"op\":\"status\"}\\n'); r = s.recv(1000)\n"
             "except OSError:\n r = b''\nprint('reply', repr(r))\n")
    uid, gid = session_user.pw_uid, session_user.pw_gid

    def become() -> None:
        os.chdir(w.alice)
        os.setgid(gid)
        os.setuid(uid)

    def run() -> str:
        return subprocess.run([python, "-I", "-S", "-c", probe], preexec_fn=become, capture_output=True,
                              text=True, timeout=20).stdout.strip()

    w.alice.chmod(0o711)
    try:
        assert run().startswith("connect 13")  # EACCES: the socket is 0600
        sock.chmod(0o666)
        assert run() == "reply b''"  # connected, but the master hung up without a word
    finally:
        sock.chmod(0o600)
        w.alice.chmod(mode)
    assert f"refused uid={uid}" in (w.alice / "control.log").read_text()
    assert w.status()["served"] == 1


def test_openssh_through_the_dropin_uses_the_master(fresh: World, tmp_path: Path) -> None:
    w = fresh
    d = tmp_path / "drop"
    assert w.ms("config", "install", "--path", str(d)).returncode == 0
    conf = tmp_path / "ssh_config"
    conf.write_text(f"Include {d / '99-meshssh.conf'}\n")
    env = w.mesh.client_env(w.alice)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    for n in range(2):
        r = subprocess.run([require_tool("ssh"), "-F", str(conf), f"{w.user}@db-1",
                            "echo hi; echo oops >&2; exit 5"], capture_output=True, timeout=60, env=env)
        assert (r.returncode, r.stdout, r.stderr) == (5, b"hi\n", b"oops\n")
    assert w.status()["served"] == 2  # both proxies ran in the master


def test_logout_stops_the_master(world: World, tmp_path: Path) -> None:
    cfg = world.mesh.login(*BOB, config_dir=tmp_path / "bob-again")
    r = world.ms(f"{world.user}@db-1", "true", cfg=cfg)
    assert r.returncode == 0, r.stderr
    st = world.status(cfg)
    assert st is not None
    r = world.ms("logout", cfg=cfg)
    assert r.returncode == 0 and b"Control master stopped." in r.stderr
    assert wait_gone(st["pid"])
    assert not (cfg / "control.sock").exists()
    r = world.ms(f"{world.user}@db-1", "true", cfg=cfg)
    assert r.returncode == 255 and b"not logged in" in r.stderr
    assert world.status(cfg) is None


@pytest.mark.slow
def test_expired_token_means_a_fresh_login(fresh: World) -> None:
    """SSH tokens live 60 s (management/idp/tokens.py); the master stops reusing a login
    5 s before its token's exp, so a call 56 s after the first one returned (its token was
    minted before that) must log in again; timing from before the call flaked under load."""
    w = fresh
    before = w.logins()
    assert w.ms(f"{w.user}@db-1", "true").returncode == 0
    t0 = time.monotonic()
    assert w.ms(f"{w.user}@db-1", "true").returncode == 0
    assert w.logins() == before + 1
    time.sleep(max(0.0, 56 - (time.monotonic() - t0)))
    assert w.ms(f"{w.user}@db-1", "true").returncode == 0
    assert w.logins() == before + 2
    assert w.status()["served"] == 3


def test_zz_policy_revocation_closes_the_pooled_login(fresh: World) -> None:
    """Last (bob leaves devs): the peer disconnects the login it no longer allows, so the
    pooled connection is gone and the next call dials — and is refused."""
    w = fresh
    before = w.logins(BOB[0])
    assert w.ms(f"{w.user}@db-1", "true", cfg=w.bob).returncode == 0
    assert w.ms(f"{w.user}@db-1", "true", cfg=w.bob).returncode == 0
    assert w.logins(BOB[0]) == before + 1
    groups = w.mesh.api("GET", "/api/groups")
    groups = groups["groups"] if isinstance(groups, dict) else groups
    devs = next(g for g in groups if g["name"] == "devs")
    w.mesh.api("PUT", f"/api/groups/{devs['id']}", {"users": [ALICE[0]]})
    log = w.bob / "control.log"
    deadline = time.monotonic() + 30
    while "reason=closed" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "session.revoked" in w.mesh.peers["db-1"].output()
    assert "reason=closed" in log.read_text()  # the peer hung up on the idle pooled login
    r = w.ms(f"{w.user}@db-1", "true", cfg=w.bob)
    assert r.returncode == 255, r.stderr
    assert w.logins(BOB[0]) == before + 1


def test_relative_config_dir_names_the_same_master(fresh: World) -> None:
    """The master runs in "/"; a relative MESHSSH_CONFIG_DIR still reaches the same one."""
    w = fresh
    env = {**w.mesh.client_env(w.alice), "MESHSSH_CONFIG_DIR": w.alice.name}
    for _ in range(2):
        r = subprocess.run([console_script("meshssh"), f"{w.user}@db-1", "echo rel"], env=env,
                           cwd=w.alice.parent, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert (r.returncode, r.stdout) == (0, b"rel\n"), r.stderr
    assert w.status()["served"] == 2
