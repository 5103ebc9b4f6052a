"""What the daemon does for a user happens with the user's credentials (issue 11: 1, 6, 12).

- The forwarded agent socket: a racer of the user's own keeps renaming a symlink to a
  root file over every agent socket path it can see while the user logs in with `ssh -A`
  again and again; root must never chown (or otherwise act on) the link's target.
- `signal` requests: a setuid-root program in the session's process group that switched
  all its ids to root is out of the user's reach, so a signal request must not reach it
  either; forced commands get no signals at all.
- The home directory is entered after the drop: a home only root may enter is not the
  session's working directory; the session starts in `/` with sshd's message.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh
import pytest

from meshsshd.config import ServerSettings
from meshsshd.netmap import AccessRule
from meshsshd.server import MeshSSHServer
from tests.support import free_port, require_root, require_tool

from .serverkit import ServerKit, client_key, install_key
from .test_server_pam import pam_service  # noqa: F401  (fixture)

pytestmark = [pytest.mark.root]

# `ssh -A` logins, PARALLEL at a time: they keep the daemon's GIL busy, which is what
# widens a window between two syscalls. Without the fix the race was won within these.
LOGINS = 240
PARALLEL = 12

# Run as the user: for every asyncssh-*/ssh-* directory that appears in /tmp, keep trying
# to rename a symlink to the victim over the agent socket names until it works.
RACER = r"""
import os, sys, tempfile, time
victim, stop, hits = sys.argv[1:4]
mine = tempfile.mkdtemp()
link = os.path.join(mine, "l")
seen, active = set(), {}
won = rounds = 0
while not os.path.exists(stop):
    rounds += 1
    if rounds % 64 == 0 or not active:
        for entry in os.scandir("/tmp"):
            if entry.name not in seen and entry.name.startswith(("asyncssh-", "ssh-")):
                seen.add(entry.name)
                active[entry.path] = time.monotonic() + 5
        with open(hits, "w") as f:
            f.write(str(won))
    for path, deadline in list(active.items()):
        if not os.path.lexists(link):
            os.symlink(victim, link)
        if "/asyncssh-" in path:   # asyncssh's: root's until the daemon chowns it
            names = ["agent"]
        else:                      # a socket the user's helper made: whatever it is called
            try:
                names = [n for n in os.listdir(path) if n.startswith("agent")]
            except OSError:
                names = None
        for name in names or ():
            try:
                os.rename(link, os.path.join(path, name))
                won += 1
                names = None
                break
            except FileNotFoundError:
                names = None
            except OSError:
                pass
        if names is None or time.monotonic() > deadline:
            del active[path]
with open(hits, "w") as f:
    f.write(str(won))
for path in (link, mine):
    try:
        os.unlink(path) if path == link else os.rmdir(path)
    except OSError:
        pass
"""


def _start_agent() -> tuple[str, int]:
    require_tool("ssh-agent")
    out = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    return re.search(r"SSH_AUTH_SOCK=([^;]+);", out).group(1), int(re.search(r"SSH_AGENT_PID=(\d+);", out).group(1))


@pytest.fixture
def user_server(tmp_path, make_user):
    require_root()
    require_tool("ssh")
    user = make_user("msr")
    key = client_key(tmp_path)
    install_key(user, key)
    config = {"authorized_keys": True,
              "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [user.pw_name]}]}
    with ServerKit(tmp_path / "server", config) as srv:
        yield srv, user, key


@pytest.mark.openssh
@pytest.mark.slow
def test_agent_socket_symlink_race_never_hands_a_root_file_to_the_user(user_server, tmp_path):
    srv, user, key = user_server
    setpriv = require_tool("setpriv")
    victim = tmp_path / "victim"
    victim.write_text("root's secret\n")
    victim.chmod(0o600)
    stop, hits = Path(f"/tmp/msr-stop-{os.getpid()}"), Path(f"/tmp/msr-hits-{os.getpid()}")
    hits.touch()
    os.chown(hits, user.pw_uid, user.pw_gid)
    sock, agent_pid = _start_agent()
    racer = subprocess.Popen([setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--",
                              sys.executable, "-I", "-S", "-c", RACER, str(victim), str(stop), str(hits)], cwd="/")
    served = logins = completed = 0
    try:
        env = {**os.environ, "SSH_AUTH_SOCK": sock}
        argv = srv.ssh_argv(user.pw_name, key, 'echo "sock=$SSH_AUTH_SOCK"', opts=["-A"])
        logins = 0
        while logins < LOGINS:
            procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                     for _ in range(PARALLEL)]
            for p in procs:
                out, _ = p.communicate(timeout=60)
                served += out.startswith(b"sock=/")
                completed += p.returncode == 0
            logins += PARALLEL
            assert victim.stat().st_uid == 0, f"root chowned the racer's symlink target (login {logins})"
    finally:
        stop.touch()
        try:
            racer.wait(10)
        except subprocess.TimeoutExpired:
            racer.kill()
        os.kill(agent_pid, signal.SIGTERM)
        stop.unlink()
        won = int(hits.read_text() or 0)
        hits.unlink()
    st = victim.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert served == completed > logins * 0.9   # every login had its agent socket
    assert won > 0      # and the racer really got its symlinks in place
    leftovers = [p for p in Path("/tmp").glob("ssh-*") if p.stat().st_uid == user.pw_uid]
    deadline = time.monotonic() + 10
    while leftovers and time.monotonic() < deadline:   # helpers clean up after the connection
        time.sleep(0.2)
        leftovers = [p for p in leftovers if p.exists()]
    assert not leftovers


@pytest.mark.openssh
def test_agent_forwarding_off_gives_no_socket(tmp_path, make_user):
    """`agent_forwarding = false` (`up --disable-ssh-agent-forwarding`): `ssh -A` gets
    no SSH_AUTH_SOCK and no helper runs; the login itself works."""
    require_root()
    require_tool("ssh")
    user = make_user("msn")
    key = client_key(tmp_path)
    install_key(user, key)
    config = {"authorized_keys": True, "agent_forwarding": False,
              "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [user.pw_name]}]}
    sock, agent_pid = _start_agent()
    try:
        with ServerKit(tmp_path / "server", config) as srv:
            r = subprocess.run(srv.ssh_argv(user.pw_name, key, 'echo "sock=$SSH_AUTH_SOCK"', opts=["-A"]),
                               env={**os.environ, "SSH_AUTH_SOCK": sock}, capture_output=True, timeout=30)
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"sock=\n"
            srv.reload(agent_forwarding=True)   # and back on without a restart
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                r = subprocess.run(srv.ssh_argv(user.pw_name, key, 'echo "sock=$SSH_AUTH_SOCK"', opts=["-A"]),
                                   env={**os.environ, "SSH_AUTH_SOCK": sock}, capture_output=True, timeout=30)
                if r.stdout.startswith(b"sock=/tmp/ssh-"):
                    break
                time.sleep(0.2)
            assert r.stdout.startswith(b"sock=/tmp/ssh-"), r.stdout
    finally:
        os.kill(agent_pid, signal.SIGTERM)


# ---- signals ----------------------------------------------------------------------------
@pytest.fixture
def suid_dir():
    """A directory the test user may enter, holding a setuid-root copy of setpriv: like
    sudo's child, what it runs has all its ids switched to root."""
    setpriv = require_tool("setpriv")
    d = Path(tempfile.mkdtemp(prefix="meshsshd-suid-"))
    d.chmod(0o755)
    shutil.copy(setpriv, d / "to-root")
    (d / "to-root").chmod(0o4755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _serve(tmp_path: Path, user, **settings) -> MeshSSHServer:
    rule = AccessRule(sources=("127.0.0.0/8",), identities=("*",), local_users=(user.pw_name,))
    base = dict(listen=(("127.0.0.1", free_port()),), state_dir=tmp_path / "state", access=(rule,))
    server = MeshSSHServer(ServerSettings(**{**base, "disable_auth": True, **settings}))
    await server.start()
    return server


def _pids(uid: int, pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-u", str(uid), "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def test_signal_request_does_not_reach_a_process_that_became_root(tmp_path, make_user, suid_dir):
    require_root()
    user = make_user("mss")
    marker = f"sleep {1000 + os.getpid() % 1000}.5"
    server = await _serve(tmp_path, user)
    try:
        async with asyncssh.connect("127.0.0.1", server.bound_addresses[0][1], username=user.pw_name,
                                    known_hosts=None, client_keys=None, agent_path=None) as conn:
            # The shell traps TERM and lives on; the root process would die of it. (Ending
            # the session kills its whole cgroup as root, by design, so the check must
            # happen while the session still runs.)
            proc = await conn.create_process(
                f"trap 'echo got-term' TERM; "
                f"{suid_dir}/to-root --reuid=0 --regid=0 --clear-groups -- {marker} </dev/null >/dev/null 2>&1 & "
                "echo started; while :; do wait; done")
            assert await proc.stdout.readline() == "started\n"
            for _ in range(50):
                if _pids(0, marker):
                    break
                await asyncio.sleep(0.1)
            root_pids = _pids(0, marker)
            assert root_pids, "the setuid stand-in did not start"
            proc.send_signal("TERM")
            assert await asyncio.wait_for(proc.stdout.readline(), 10) == "got-term\n"   # it reached the group
            await asyncio.sleep(0.3)
            assert _pids(0, marker) == root_pids   # root's process is out of the user's reach
            proc.send_signal("KILL")
            result = await asyncio.wait_for(proc.wait(), 10)
            assert result.exit_signal is not None and result.exit_signal[0] == "KILL"   # the user's shell
    finally:
        subprocess.run(["pkill", "-KILL", "-f", marker], check=False)
        await server.stop()


async def test_forced_command_gets_no_signals(tmp_path, make_user):
    require_root()
    user = make_user("msf")
    marker = f"sleep {2000 + os.getpid() % 1000}.5"
    key = asyncssh.generate_private_key("ssh-ed25519")
    ssh_dir = Path(user.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(f'command="echo ready; {marker}" {key.export_public_key().decode()}')
    for p in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(p, user.pw_uid, user.pw_gid)
    identity = f"key:{key.get_fingerprint('sha256')}"
    rule = AccessRule(sources=("127.0.0.0/8",), identities=(identity,), local_users=(user.pw_name,))
    server = await _serve(tmp_path, user, disable_auth=False, authorized_keys=True, access=(rule,))
    try:
        async with asyncssh.connect("127.0.0.1", server.bound_addresses[0][1], username=user.pw_name,
                                    known_hosts=None, client_keys=[key], agent_path=None) as conn:
            proc = await conn.create_process("anything")
            assert await proc.stdout.readline() == "ready\n"   # the child runs and is known
            proc.send_signal("TERM")
            await asyncio.sleep(1.0)
            assert _pids(user.pw_uid, marker), "a signal reached the forced command"
            assert proc.exit_status is None and proc.exit_signal is None
        for _ in range(100):   # the hang-up still ends it
            if not _pids(user.pw_uid, marker):
                break
            await asyncio.sleep(0.1)
        assert not _pids(user.pw_uid, marker)
    finally:
        await server.stop()


# ---- working directory ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exec", "pty-exec", "login-shell"])
async def test_home_only_root_may_enter_is_not_the_working_directory(tmp_path, make_user, kind):
    require_root()
    user = make_user("msh")
    home = Path(tempfile.mkdtemp(prefix="meshsshd-roothome-"))   # root's, mode 0700
    subprocess.run(["usermod", "-d", str(home), user.pw_name], check=True)
    server = await _serve(tmp_path, user)
    try:
        async with asyncssh.connect("127.0.0.1", server.bound_addresses[0][1], username=user.pw_name,
                                    known_hosts=None, client_keys=None, agent_path=None) as conn:
            if kind == "login-shell":
                r = await conn.run(input="pwd\n", request_pty=False)
            else:
                r = await conn.run("pwd", request_pty="force" if kind == "pty-exec" else False)
        out = (r.stdout + r.stderr).replace("\r", "")
        assert r.stdout.replace("\r", "").splitlines()[-1] == "/", out   # (a PTY mixes stderr in)
        assert f"Could not chdir to home directory {home}: Permission denied" in out
    finally:
        await server.stop()
        home.rmdir()


async def test_home_is_entered_with_the_users_rights(tmp_path, make_user):
    """The ordinary case keeps working the same through the new step: cwd = home, and
    the step's own variables (PWD, OLDPWD from `cd`) do not reach the program."""
    require_root()
    user = make_user("msk")
    server = await _serve(tmp_path, user)
    try:
        async with asyncssh.connect("127.0.0.1", server.bound_addresses[0][1], username=user.pw_name,
                                    known_hosts=None, client_keys=None, agent_path=None) as conn:
            r = await conn.run("/bin/pwd; tr '\\0' '\\n' < /proc/$$/environ | grep -c PWD || true")
            login = await conn.run(input="/bin/pwd\n", request_pty=False)
        assert r.stdout.splitlines() == [user.pw_dir, "0"], r.stdout + r.stderr
        assert login.stdout.strip() == user.pw_dir and "Could not chdir" not in login.stderr
    finally:
        await server.stop()


async def test_agent_socket_failure_leaves_the_session_working(tmp_path, make_user, monkeypatch, caplog):
    """A helper that cannot make the socket (failure injected): the session still runs,
    without SSH_AUTH_SOCK, and the log says why."""
    require_root()
    from meshsshd.session import _agent

    user = make_user("msb")
    shared = Path(tempfile.mkdtemp(prefix="meshsshd-helper-"))   # readable by the user
    shared.chmod(0o755)
    broken = shared / "broken_helper.py"
    broken.write_text("import os, sys\nos.write(2, b'meshsshd: agent socket: No space left on device\\n')\nsys.exit(1)\n")
    broken.chmod(0o644)
    monkeypatch.setattr(_agent, "HELPER", str(broken))
    sock, agent_pid = _start_agent()
    server = await _serve(tmp_path, user)
    try:
        async with asyncssh.connect("127.0.0.1", server.bound_addresses[0][1], username=user.pw_name,
                                    known_hosts=None, client_keys=None, agent_path=sock,
                                    agent_forwarding=True) as conn:
            r = await conn.run('echo "sock=$SSH_AUTH_SOCK"')
        assert r.exit_status == 0 and r.stdout == "sock=\n"
        errors = [rec.fields.get("error") for rec in caplog.records if rec.getMessage() == "agent.socket-failed"]
        assert errors == ["meshsshd: agent socket: No space left on device"]
    finally:
        await server.stop()
        os.kill(agent_pid, signal.SIGTERM)
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.openssh
def test_detached_session_enters_home_as_the_user(tmp_path, make_user):
    """The detached-session holder (root) starts its child in `/` too; the home only root
    may enter stays out of reach, with sshd's message in the session's stderr."""
    import json
    import pwd

    from .detachkit import SUBSYSTEM, kill_holders

    require_root()
    require_tool("ssh")
    name = make_user("msd").pw_name
    home = Path(tempfile.mkdtemp(prefix="meshsshd-roothome-"))   # root's, mode 0700
    subprocess.run(["usermod", "-d", str(home), name], check=True)
    user = pwd.getpwnam(name)
    key = client_key(tmp_path)
    install_key(user, key)
    config = {"authorized_keys": True,
              "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [name]}]}

    def request(srv, doc):
        r = srv.ssh(name, key, SUBSYSTEM, opts=["-s"], input=json.dumps(doc).encode() + b"\n", timeout=30)
        first, _, body = r.stdout.partition(b"\n")
        return json.loads(first), body, r.stderr

    try:
        with ServerKit(tmp_path / "server", config) as srv:
            answer, _, _ = request(srv, {"op": "start", "command": "pwd", "pty": False})
            assert answer["ok"], answer
            answer, body, err = request(srv, {"op": "receive", "id": answer["id"], "follow": True})
            assert body == b"/\n"
            assert f"Could not chdir to home directory {home}: Permission denied".encode() in err
    finally:
        kill_holders(tmp_path)
        shutil.rmtree(home, ignore_errors=True)


async def test_signal_reaches_a_job_control_shell_under_pam(tmp_path, pam_service, monkeypatch):
    """Under PAM the session's child is the root helper and an interactive shell leads a
    process group of its own: the signal (sent as the user) must reach the shell, and the
    helper must live on to close the PAM session."""
    from .test_server_pam import _wait_lines

    name, user, log = pam_service
    monkeypatch.setenv("MESHSSHD_PAM_SERVICE", name)
    server = await _serve(tmp_path, user)
    try:
        async with asyncssh.connect("127.0.0.1", server.bound_addresses[0][1], username=user.pw_name,
                                    known_hosts=None, client_keys=None, agent_path=None) as conn:
            proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
            proc.stdin.write("echo rea''dy\n")
            output = ""
            while "ready" not in output:
                output += await asyncio.wait_for(proc.stdout.read(1024), 10)
            proc.send_signal("KILL")
            result = await asyncio.wait_for(proc.wait(), 10)
            assert result.exit_signal is not None and result.exit_signal[0] == "KILL"
        lines = _wait_lines(log, 2)
        assert lines[0].startswith(f"open_session {user.pw_name}") and lines[1].startswith(
            f"close_session {user.pw_name}")   # the helper was not killed
    finally:
        await server.stop()
