"""Remoting over a dozen real peers of a single-machine mesh: `meshssh exec` fan-out and
subsystems set from management.

Management and 13 `meshsshd up --dataplane none` processes (12 targets and the laptop
the client runs from), shared by both parts to keep the suite fast.

Fan-out: one target is SSH-enabled but in no policy for alice (management refuses her
token), one is stopped before the runs (connection refused). Output prefixes, stderr
kept apart, --json shape, exit codes, the failure summary, the throttle, --timeout, one
token-exchange request, the progress bar on a terminal, and the exec audit events on
management are checked.

Subsystems: pwsh cannot be installed here, so the subsystem is a small stand-in
speaking a line protocol over stdin/stdout (as `pwsh -sshs` speaks PSRP): it greets with
the user it runs as, then answers every line. It is set with `meshmgmt peers subsystem
set` (per peer) and `meshmgmt groups subsystem set` (per group), reaches the peer in its
network map, is used with `meshssh -s` and native `ssh -s` through the drop-in, and the
audit log on management records each use.
"""

from __future__ import annotations

import json
import os
import pty
import secrets
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
WEB = [f"web-{i}" for i in range(1, 7)]
DB = [f"db-{i}" for i in range(1, 6)]
LONELY = "lonely-1"  # SSH-enabled, but no policy lets alice in: management refuses her token
DOWN = "db-5"  # stopped before the runs
UP = [*WEB, *DB[:-1]]


class Fleet:
    def __init__(self, mesh: Mesh, cfg: Path, user: str) -> None:
        self.mesh = mesh
        self.cfg = cfg
        self.user = user
        self.ips = {n: mesh.status(n)["mesh_ip"] for n in [*UP, LONELY]}

    def exec(self, *args: str, timeout: float = 90):
        return self.mesh.meshssh(self.cfg, "exec", "-l", self.user, *args, timeout=timeout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, session_user) -> Iterator[Fleet]:
    require_root()
    mesh = Mesh(tmp_path_factory.mktemp("fanout")).start()
    try:
        mesh.add_user(*ALICE)
        for g, users in (("devs", [ALICE[0]]), ("laptops", []), ("web", []), ("db", []), ("misc", []),
                         ("ops", [])):
            mesh.add_group(g, users)
        mesh.add_ssh_policy("devs-ssh", ["devs", "laptops"], ["web", "db"])
        mesh.add_ssh_policy("ops-ssh", ["ops", "laptops"], ["misc"])
        for names, group in ((WEB, "web"), (DB, "db"), ([LONELY], "misc")):
            key = mesh.setup_key(group)
            for n in names:
                mesh.add_peer(n, key, "--allow-server-ssh", wait=None)
        mesh.add_peer("laptop", mesh.setup_key("laptops"), wait=None)
        # Thirteen daemons start at once on two cores (imports, RSA-3072 host keys): a
        # generous bound on a busy machine; it is a readiness wait, not a speed check.
        for n in [*WEB, *DB, LONELY]:
            mesh.wait_status(n, "serving", timeout=180)
        mesh.wait_status("laptop", None, timeout=180)
        cfg = mesh.login(*ALICE)
        mesh.stop_peer(DOWN)
        yield Fleet(mesh, cfg, session_user.pw_name)
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()


ALL = "group:web,group:db," + LONELY


def test_text_output_prefixed_and_failures_summarised(fleet: Fleet) -> None:
    r = fleet.exec("-v", "--hosts", ALL, "--", "echo out-line; echo err-line >&2")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 255, err  # a peer refused and one is down
    width = max(len(n) for n in [*WEB, *DB, LONELY])
    for n in UP:
        assert f"{n:<{width}}: out-line\n" in out, out
        assert f"{n:<{width}}: err-line\n" in err, err
        assert f"{n:<{width}}: err-line" not in out
    assert f"{DOWN:<{width}}: out-line" not in out
    summary = err[err.index("meshssh exec: 10 of 12 peers succeeded"):]
    assert "; 2 failed:" in summary
    assert f"  {DOWN}: " in summary and "Connection refused" in summary
    assert f"  {LONELY}: " in summary and "no policy" in summary
    assert "12 peers, SSH tokens from 1 token-exchange request(s)" in err



def test_summary_keeps_the_peers_own_reason(fleet: Fleet) -> None:
    """The peer says why (in its auth banner) where the single-host path shows it; the
    fan-out summary used to say only "permission denied"."""
    one = fleet.mesh.meshssh(fleet.cfg, f"root@{WEB[0]}", "true", timeout=60)
    assert one.returncode == 255 and b"root login is disabled on this peer" in one.stderr, one.stderr
    r = fleet.mesh.meshssh(fleet.cfg, "exec", "-l", "root", "--hosts", f"{WEB[0]},{WEB[1]}", "--", "true",
                           timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 255, err
    for name in WEB[:2]:
        assert f"  {name}: root@{name}: permission denied: meshsshd: root login is disabled on this peer" in err, err


def test_exit_one_when_every_peer_ran_but_a_command_failed(fleet: Fleet, tmp_path: Path) -> None:
    failing = fleet.ips["web-2"]
    cmd = f'case " $SSH_CONNECTION " in *" {failing} "*) exit 3;; esac; echo fine'
    hosts = tmp_path / "hosts"
    hosts.write_text("# the web tier\n" + "\n".join(WEB) + "\n")
    r = fleet.exec("--hosts-file", str(hosts), "--", cmd)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "meshssh exec: 5 of 6 peers succeeded" in err and "  web-2: exit status 3" in err
    assert r.stdout.decode().count(": fine\n") == 5


def test_json_one_object_per_peer(fleet: Fleet) -> None:
    r = fleet.exec("--json", "--hosts", ALL, "--", "printf 'a\\nb\\n'; printf e >&2; exit 0")
    assert r.returncode == 255
    docs = [json.loads(line) for line in r.stdout.decode().splitlines()]
    by_name = {d["name"]: d for d in docs}
    assert sorted(by_name) == sorted([*WEB, *DB, LONELY])
    for d in docs:
        assert set(d) >= {"name", "exit_status", "stdout", "stderr", "duration", "error"}
        assert isinstance(d["duration"], float)
    for n in UP:
        assert by_name[n]["exit_status"] == 0 and by_name[n]["error"] is None
        assert by_name[n]["stdout"] == "a\nb\n" and by_name[n]["stderr"] == "e"
    assert by_name[DOWN]["exit_status"] is None and "Connection refused" in by_name[DOWN]["error"]
    assert by_name[LONELY]["exit_status"] is None and "no policy" in by_name[LONELY]["error"]


def test_json_output_is_bounded(fleet: Fleet) -> None:
    r = fleet.exec("--json", "--max-output", "1000", "--hosts", "web-1", "--", "head -c 100000 /dev/zero")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and len(doc["stdout"]) == 1000 and doc["stdout_truncated"] is True


def test_throttle_bounds_concurrency(fleet: Fleet) -> None:
    """Each command marks itself running in a shared directory, looks how many others
    are running, and leaves; with --throttle 3 no one ever sees more than 3."""
    d = Path(tempfile.mkdtemp(prefix="fanout-"))  # not under pytest's 0700 tmp: the user writes here
    try:
        d.chmod(0o777)
        cmd = (f"touch {d}/$$; sleep 1; ls {d} | wc -l; rm -f {d}/$$")
        r = fleet.exec("--throttle", "3", "--hosts", "group:web,group:db", "--json", "--", cmd)
        docs = [json.loads(line) for line in r.stdout.decode().splitlines()]
        seen = [int(x["stdout"]) for x in docs if x["exit_status"] == 0]
        assert len(seen) == len(UP), docs
        assert 2 <= max(seen) <= 3
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_audit_events_for_each_exec(fleet: Fleet) -> None:
    marker = f"audit-{secrets.token_hex(4)}"
    r = fleet.exec("--hosts", ALL, "--", f"echo {marker}")
    assert r.returncode == 255
    peer_ids = {p["name"]: p["id"] for p in fleet.mesh.api("GET", "/api/peers")["peers"]}
    want = {peer_ids[n] for n in UP}
    deadline = time.monotonic() + 20
    got: set[str] = set()
    while time.monotonic() < deadline:
        got, since = set(), 0
        while True:
            page = fleet.mesh.api("GET", f"/api/events?since={since}&limit=1000")
            for e in page["events"]:
                if e["type"] == "exec" and marker in (e.get("command") or ""):
                    assert e["identity"] == ALICE[0] and e["local_user"] == fleet.user
                    got.add(e["peer_id"])
            if not page["events"]:
                break
            since = page["next"]
        if got >= want:
            break
        time.sleep(0.5)
    assert got == want


def test_progress_bar_on_a_terminal(fleet: Fleet) -> None:
    """stderr on a terminal: a progress bar is drawn (rich), stdout stays clean lines."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [console_script("meshssh"), "exec", "-l", fleet.user, "--hosts", "group:web", "--", "echo tick"],
            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
            env=fleet.mesh.client_env(fleet.cfg, COLUMNS="100", TERM="xterm"))
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    assert sorted(out.decode().splitlines()) == [f"{n}: tick" for n in WEB]
    text = seen.decode(errors="replace")
    assert "6/6" in text and "meshssh exec: 6 of 6 peers succeeded" in text


def test_timeout_gives_up_on_a_slow_peer_only(fleet: Fleet) -> None:
    slow = fleet.ips["web-3"]
    cmd = f'case " $SSH_CONNECTION " in *" {slow} "*) sleep 60;; esac; echo quick'
    r = fleet.exec("--timeout", "5", "--hosts", "web-2,web-3,web-4", "--", cmd, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 255, err
    assert "  web-3: timed out after 5 s" in err
    assert sorted(r.stdout.decode().splitlines()) == ["web-2: quick", "web-4: quick"]


# ------------------------------------------------------------------ subsystems

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
        return self.mesh.meshssh(self.cfg, "-s", "-l", self.user, SUBSYS_PEER, name, input=data, timeout=30)

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


SUBSYS_PEER, SUBSYS_GROUP = "web-1", "web"


@pytest.fixture(scope="module")
def world(fleet: Fleet) -> Iterator[World]:
    require(Path(SYSTEM_PYTHON).exists(), f"needs {SYSTEM_PYTHON} for the stand-in subsystem")
    # The stand-in runs as the test user, who cannot read pytest's 0700 tmp dirs.
    script_dir = Path(tempfile.mkdtemp(prefix="subsys-"))
    try:
        script_dir.chmod(0o755)
        script = script_dir / "standin.py"
        script.write_text(STANDIN)
        script.chmod(0o644)
        yield World(fleet.mesh, fleet.cfg, fleet.user, script)
    finally:
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
    r = world.mgmt("peers", "subsystem", "set", SUBSYS_PEER, "echoes", world.command("peer"))
    assert r.returncode == 0, r.stderr
    got = world.wait_served("echoes", "peer")
    assert got.stdout == f"READY peer {world.user}\nOK olleh\nOK dlrow\nBYE\n".encode()
    listed = world.mgmt("--json", "peers", "subsystem", "list", SUBSYS_PEER)
    assert '"name": "echoes"' in listed.stdout
    peer_id = world.mesh.status(SUBSYS_PEER)["peer_id"]
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
    r = world.mgmt("groups", "subsystem", "set", SUBSYS_GROUP, "grouped", world.command("group"))
    assert r.returncode == 0, r.stderr
    world.wait_served("grouped", "group")
    assert world.mgmt("peers", "subsystem", "set", SUBSYS_PEER, "grouped", world.command("override")).returncode == 0
    world.wait_served("grouped", "override")
    assert world.mgmt("peers", "subsystem", "unset", SUBSYS_PEER, "grouped").returncode == 0
    world.wait_served("grouped", "group")


def test_unset_subsystem_is_refused(world: World) -> None:
    assert world.mgmt("peers", "subsystem", "set", SUBSYS_PEER, "gone", world.command("gone")).returncode == 0
    world.wait_served("gone", "gone")
    assert world.mgmt("peers", "subsystem", "unset", SUBSYS_PEER, "gone").returncode == 0
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
    assert world.mgmt("peers", "subsystem", "set", SUBSYS_PEER, "native", world.command("native")).returncode == 0
    world.wait_served("native", "native")
    r = world.mesh.meshssh(world.cfg, "config", "install", "--path", str(tmp_path / "drop"))
    assert r.returncode == 0, r.stderr
    conf = tmp_path / "ssh_config"
    conf.write_text(f"Include {tmp_path / 'drop' / '99-meshssh.conf'}\n")
    env = world.mesh.client_env(world.cfg)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    r = subprocess.run([require_tool("ssh"), "-F", str(conf), "-s", f"{world.user}@{SUBSYS_PEER}", "native"],
                       input=b"abc\n", capture_output=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"READY native {world.user}\nOK cba\nBYE\n".encode()
