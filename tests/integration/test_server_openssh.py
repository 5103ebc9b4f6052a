"""meshsshd serve driven by the system OpenSSH client: sessions, files, forwards.

One server (authorized_keys logins, SFTP and both forward directions on, one configured
subsystem) and one throwaway user serve the whole module; tests that need other settings
start their own server with ServerKit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import time
from pathlib import Path

import asyncssh
import paramiko
import pytest

from tests.support import REPO, free_port, os_user, require, require_root, require_tool

from .serverkit import ClientKey, ServerKit, client_key, install_key, read_until

pytestmark = [pytest.mark.openssh, pytest.mark.root]

NODE_CLIENTS = REPO / "tests" / "clients" / "node"   # npm ci there: scripts/install-deps.sh

SUBSYSTEM_SCRIPT = """#!/bin/sh
echo "subsystem as $(id -un)"
exec cat
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_root()
    require_tool("ssh")
    tmp = tmp_path_factory.mktemp("srv")
    key = client_key(tmp)
    shared = Path(tempfile.mkdtemp(prefix="meshsshd-subsys-"))   # readable by the test user
    shared.chmod(0o755)
    with os_user("mso") as user:
        install_key(user, key)
        script = shared / "stand-in-subsystem"
        script.write_text(SUBSYSTEM_SCRIPT)
        script.chmod(0o755)
        config = {
            "authorized_keys": True,
            "sftp": True,
            "local_port_forwarding": True,
            "remote_port_forwarding": True,
            "subsystems": {"standin": str(script)},
            "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [user.pw_name]}],
        }
        try:
            with ServerKit(tmp / "server", config) as srv:
                yield srv, user, key, tmp
        finally:
            shutil.rmtree(shared, ignore_errors=True)


def run(srv, user, key, *cmd, **kw):
    return srv.ssh(user.pw_name, key, *cmd, **kw)


# ---- exec -------------------------------------------------------------------------------
def test_exec_runs_as_user_with_exit_status(world):
    srv, user, key, _ = world
    r = run(srv, user, key, "id -u; echo to-err >&2; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout.decode().strip() == str(user.pw_uid)
    assert r.stderr.decode().strip() == "to-err"
    assert run(srv, user, key, "true").returncode == 0


def test_signal_killed_command_makes_ssh_exit_255(world):
    srv, user, key, _ = world
    r = run(srv, user, key, "echo before; kill -TERM $$")
    assert r.returncode == 255
    assert r.stdout == b"before\n"


def test_stderr_after_stdout_closed_is_not_lost(world):
    srv, user, key, _ = world
    r = run(srv, user, key, "exec 1>&-; sleep 0.3; echo late >&2; exit 3")
    assert r.returncode == 3
    assert r.stderr == b"late\n"


def test_stdin_reaches_command_and_large_output_arrives_whole(world):
    srv, user, key, _ = world
    data = os.urandom(3 * 1024 * 1024)
    r = run(srv, user, key, "sha256sum; head -c 5000000 /dev/zero", input=data)
    assert r.returncode == 0
    assert r.stdout.startswith(hashlib.sha256(data).hexdigest().encode())
    assert r.stdout.count(b"\0") == 5_000_000


def test_no_pty_no_command_shell_reads_stdin(world):
    """What VS Code Remote-SSH does: `ssh -T host` with a script on stdin."""
    srv, user, key, _ = world
    r = srv.ssh(user.pw_name, key, opts=["-T"], input=b"echo hello from $USER\nexit 4\n")
    assert r.returncode == 4
    assert r.stdout.decode().strip() == f"hello from {user.pw_name}"


def test_environment_is_clean_and_client_env_allowlisted(world):
    srv, user, key, _ = world
    opts = ["-o", "SetEnv=LC_MESH=yes LANG=C.UTF-8 EDITOR=vim TZ=:/tmp/tz LD_PRELOAD=/tmp/evil.so PATH=/evil "
                  "MESH_SECRET=1"]
    r = run(srv, user, key, "env", opts=opts)
    env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines() if "=" in line)
    assert env["LC_MESH"] == "yes" and env["LANG"] == "C.UTF-8"
    # The default is sshd's AcceptEnv as Debian ships it, LANG LC_*, and nothing wider.
    assert "EDITOR" not in env and "TZ" not in env
    assert "LD_PRELOAD" not in env and "MESH_SECRET" not in env
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin:/usr/games"
    assert env["USER"] == env["LOGNAME"] == user.pw_name
    assert env["HOME"] == user.pw_dir and env["SHELL"] == user.pw_shell
    assert env["MAIL"] == f"/var/mail/{user.pw_name}"
    client_ip, client_port, server_port = env["SSH_CLIENT"].split()
    assert client_ip == "127.0.0.1" and server_port == str(srv.port)
    assert env["SSH_CONNECTION"].split()[2:] == ["127.0.0.1", str(srv.port)]
    assert "SSH_TTY" not in env
    assert "MESHSSHD" not in " ".join(env)   # nothing of the daemon's own environment


def test_files_are_created_with_the_users_ids(world):
    srv, user, key, _ = world
    assert run(srv, user, key, "touch created-by-exec; umask").stdout.strip() == b"0022"
    st = os.stat(Path(user.pw_dir) / "created-by-exec")
    assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)
    assert st.st_mode & 0o777 == 0o644


# ---- PTY --------------------------------------------------------------------------------
def _spawn_on_pty(argv, rows, cols):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def make_ctty():  # test-only: the ssh client needs a controlling terminal for SIGWINCH
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=make_ctty)
    os.close(slave)
    return proc, master


def test_pty_shell_has_terminal_and_follows_resize(world):
    srv, user, key, _ = world
    script = "trap 'echo WINCH $(stty size)' WINCH; echo SIZE $(stty size) TTY $(tty) TERM $TERM; while sleep 0.1; do :; done"
    argv = srv.ssh_argv(user.pw_name, key, "-tt", script)
    proc, master = _spawn_on_pty(argv, 30, 100)
    try:
        m, _ = read_until(master, rb"SIZE (\d+) (\d+) TTY (\S+) TERM (\S+)")
        assert m.group(1, 2) == (b"30", b"100")
        assert m.group(3).startswith(b"/dev/pts/")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        m, _ = read_until(master, rb"WINCH (\d+) (\d+)")
        assert m.group(1, 2) == (b"40", b"120")
        os.write(master, b"\x03")   # Ctrl-C through the terminal: the shell dies of SIGINT
        assert proc.wait(15) in (130, 255)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_pty_login_shell_job_control_who_and_last(world):
    srv, user, key, _ = world
    argv = srv.ssh_argv(user.pw_name, key, opts=["-tt"])
    proc, master = _spawn_on_pty(argv, 24, 80)
    try:
        os.write(master, b"echo TTY=$(tty) PG=$(ps -o tpgid= -p $$) SID=$(ps -o sid= -p $$); who\n")
        m, buf = read_until(master, rb"TTY=(/dev/pts/\d+) PG=\s*(\d+) SID=\s*(\d+)")
        tty = m.group(1).decode()
        _, buf = read_until(master, re.escape(user.pw_name.encode()) + rb"\s+" + re.escape(tty[5:].encode()),
                             buf=buf[m.end():])
        assert int(m.group(2)) != 0   # the shell has a controlling terminal with a foreground group
        os.write(master, b"exit 5\n")
        assert proc.wait(15) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    last = subprocess.run(["last", "-w", user.pw_name], capture_output=True, text=True).stdout
    assert tty[5:] in last and "127.0.0.1" in last


# ---- files ------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_sftp_put_get_100mib(world, tmp_path):
    srv, user, key, _ = world
    src = tmp_path / "src.bin"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    back = tmp_path / "back.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} upload.bin\nget upload.bin {back}\n")
    r = subprocess.run([require_tool("sftp"), *srv.tool_opts(key), "-b", str(batch),
                        f"{user.pw_name}@127.0.0.1"], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    remote = Path(user.pw_dir) / "upload.bin"
    assert os.stat(remote).st_uid == user.pw_uid
    assert _sha256(src) == _sha256(back) == _sha256(remote)


def _ln_openssh(srv: ServerKit, user: pwd.struct_passwd, key: ClientKey, target: str, link: str) -> None:
    r = subprocess.run([require_tool("sftp"), *srv.tool_opts(key), "-b", "-", f"{user.pw_name}@127.0.0.1"],
                       input=f"ln -s {target} {link}\n".encode(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _ln_asyncssh(srv: ServerKit, user: pwd.struct_passwd, key: ClientKey, target: str, link: str) -> None:
    async def make() -> None:
        async with asyncssh.connect("127.0.0.1", srv.port, username=user.pw_name, client_keys=[str(key.path)],
                                    known_hosts=None, agent_path=None, config=None) as conn:
            async with conn.start_sftp_client() as sftp:
                await sftp.symlink(target, link)
    asyncio.run(make())


def _ln_paramiko(srv: ServerKit, user: pwd.struct_passwd, key: ClientKey, target: str, link: str) -> None:
    with paramiko.SSHClient() as ssh:
        ssh.set_missing_host_key_policy(paramiko.AutoAddPolicy())   # as SSH_BASE_OPTS
        ssh.connect("127.0.0.1", srv.port, user.pw_name, key_filename=str(key.path), timeout=20,
                    allow_agent=False, look_for_keys=False)
        with ssh.open_sftp() as sftp:
            sftp.symlink(target, link)


def _ln_node_ssh2(srv: ServerKit, user: pwd.struct_passwd, key: ClientKey, target: str, link: str) -> None:
    node = require_tool("node")
    require((NODE_CLIENTS / "node_modules" / "ssh2").is_dir(),
            f"needs node's ssh2 in {NODE_CLIENTS}: run scripts/install-deps.sh")
    r = subprocess.run([node, str(NODE_CLIENTS / "sftp_symlink.js"), "127.0.0.1", str(srv.port), user.pw_name,
                        str(key.path), target, link], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _ln_curl(srv: ServerKit, user: pwd.struct_passwd, key: ClientKey, target: str, link: str) -> None:
    # The quote command's paths are relative to the login directory, as sftp-server sees them.
    r = srv.curl_sftp(user.pw_name, key, "~/", "-o", "/dev/null", "-Q", f"symlink {target} {link}")
    assert r.returncode == 0, r.stderr


SYMLINK_CLIENTS = {"openssh": _ln_openssh, "asyncssh": _ln_asyncssh, "paramiko": _ln_paramiko,
                   "node-ssh2": _ln_node_ssh2, "curl-libssh2": _ln_curl}


@pytest.mark.parametrize("kind", ["existing", "missing"])
@pytest.mark.parametrize("client", list(SYMLINK_CLIENTS))
def test_sftp_symlink_points_at_its_target_from_every_client(world, client, kind):
    """SYMLINK's two paths come in OpenSSH's order from OpenSSH's sftp, paramiko and
    curl/libssh2 (which must not be swapped: its `libssh2_` once passed for libssh), and
    in the draft's from asyncssh and node's ssh2 (which swap only for servers calling
    themselves OpenSSH); the link must point at the target either way, also when the
    target is missing (a backwards link would then be created silently).
    The other clients of issue 12 cannot make a symlink: PuTTY's psftp 0.78 has no ln
    command (its `help` lists none), and dropbear ships no SFTP client at all."""
    srv, user, key, _ = world
    home = Path(user.pw_dir)
    # Names of its own per case: a backwards link one client left must not be another's target.
    target, link = f"{kind}-{client}.txt", f"link-to-{kind}-{client}"
    for name in (target, link):
        (home / name).unlink(missing_ok=True)
    if kind == "existing":
        (home / target).write_text("x")
    SYMLINK_CLIENTS[client](srv, user, key, target, link)
    assert os.readlink(home / link) == target


@pytest.mark.parametrize("mode", [[], ["-O"]], ids=["sftp-protocol", "legacy-scp"])
def test_scp_both_modes(world, tmp_path, mode):
    srv, user, key, _ = world
    src = tmp_path / "payload"
    src.write_bytes(os.urandom(2_000_000))
    name = f"scp-{'O' if mode else 's'}"
    up = subprocess.run([require_tool("scp"), *mode, *srv.tool_opts(key), str(src), f"{user.pw_name}@127.0.0.1:{name}"],
                        capture_output=True, timeout=60)
    assert up.returncode == 0, up.stderr
    down = tmp_path / "down"
    r = subprocess.run([require_tool("scp"), *mode, *srv.tool_opts(key), f"{user.pw_name}@127.0.0.1:{name}", str(down)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert down.read_bytes() == src.read_bytes()
    assert os.stat(Path(user.pw_dir) / name).st_uid == user.pw_uid


def test_configured_subsystem_runs_as_user(world):
    srv, user, key, _ = world
    r = run(srv, user, key, "standin", opts=["-s"], input=b"ping\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == f"subsystem as {user.pw_name}\nping\n"
    r = run(srv, user, key, "no-such-subsystem", opts=["-s"])
    assert r.returncode != 0


# ---- forwarding -------------------------------------------------------------------------
class _EchoServer:
    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - child
            try:
                while True:
                    c, _ = self.sock.accept()
                    data = c.recv(65536)
                    c.sendall(b"echo:" + data)
                    c.close()
            finally:
                os._exit(0)
        self.sock.close()

    def close(self):
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


@pytest.fixture
def echo_server():
    srv = _EchoServer()
    yield srv
    srv.close()


def _talk(port, payload=b"hi", timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(payload)
                data = s.recv(65536)
                if data:
                    return data
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answered on port {port}")
        time.sleep(0.1)


def _background_ssh(srv, user, key, opts):
    return subprocess.Popen(srv.ssh_argv(user.pw_name, key, opts=["-N", "-o", "ExitOnForwardFailure=yes", *opts]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(proc):
    proc.terminate()
    proc.wait(10)


def test_local_forward(world, echo_server):
    srv, user, key, _ = world
    lport = free_port()
    proc = _background_ssh(srv, user, key, ["-L", f"{lport}:127.0.0.1:{echo_server.port}"])
    try:
        assert _talk(lport) == b"echo:hi"
    finally:
        _stop(proc)


def test_remote_forward_and_refusals(world, echo_server):
    srv, user, key, _ = world
    rport = free_port()
    proc = _background_ssh(srv, user, key, ["-R", f"{rport}:127.0.0.1:{echo_server.port}"])
    try:
        assert _talk(rport) == b"echo:hi"
    finally:
        _stop(proc)
    # After the client left, the listener is gone (clean cancel).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", rport), timeout=1).close()
            time.sleep(0.1)
        except OSError:
            break
    else:
        raise AssertionError("remote forward listener survived its connection")
    for spec in (f"0.0.0.0:{free_port()}:127.0.0.1:1", "800:127.0.0.1:1"):
        p = _background_ssh(srv, user, key, ["-R", spec])
        assert p.wait(20) == 255, spec
        assert b"remote port forwarding failed" in p.stderr.read()


def test_dynamic_forward_socks(world, echo_server):
    srv, user, key, _ = world
    sport = free_port()
    proc = _background_ssh(srv, user, key, ["-D", str(sport)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", sport), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with s:  # SOCKS5, no auth, CONNECT 127.0.0.1:port
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", echo_server.port))
            reply = s.recv(10)
            assert reply[:2] == b"\x05\x00", reply
            s.sendall(b"socks")
            assert s.recv(100) == b"echo:socks"
    finally:
        _stop(proc)


def test_local_forward_to_closed_port_fails_cleanly(world):
    srv, user, key, _ = world
    lport, dead = free_port(), free_port()
    proc = _background_ssh(srv, user, key, ["-L", f"{lport}:127.0.0.1:{dead}"])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", lport), timeout=5) as s:
                    assert s.recv(10) == b""   # channel open failed → ssh closes the socket
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert proc.poll() is None   # the connection survives a failed forward
        assert run(srv, user, key, "echo alive").stdout == b"alive\n"
    finally:
        _stop(proc)


@contextlib.contextmanager
def ssh_agent():
    """A running ssh-agent for the test; the environment that reaches it."""
    require_tool("ssh-agent")
    out = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    sock = re.search(r"SSH_AUTH_SOCK=([^;]+);", out).group(1)
    pid = int(re.search(r"SSH_AGENT_PID=(\d+);", out).group(1))
    try:
        yield {**os.environ, "SSH_AUTH_SOCK": sock}
    finally:
        os.kill(pid, signal.SIGTERM)


def test_agent_forwarding_socket_belongs_to_user(world, tmp_path):
    srv, user, key, _ = world
    with ssh_agent() as env:
        subprocess.run(["ssh-add", str(key.path)], env=env, check=True, capture_output=True)
        command = 'stat -c "%U %a" $SSH_AUTH_SOCK "$(dirname $SSH_AUTH_SOCK)"; ssh-add -l'
        r = subprocess.run(srv.ssh_argv(user.pw_name, key, command, opts=["-A"]),
                           env=env, capture_output=True, timeout=30)
        lines = r.stdout.decode().splitlines()
        assert r.returncode == 0, r.stderr
        assert lines[:2] == [f"{user.pw_name} 600", f"{user.pw_name} 700"]   # made by the user, private
        assert key.fingerprint in lines[2]


# ---- refusals ---------------------------------------------------------------------------
def test_unknown_key_and_other_user_refused(world, tmp_path):
    srv, user, key, _ = world
    stranger = client_key(tmp_path, "stranger")
    r = run(srv, user, stranger, "true")
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    r = srv.ssh("nobody", key, "true")
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    r = srv.ssh("bad;name", key, "true")
    assert r.returncode == 255


def test_identification_string(world):
    srv, *_ = world
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        banner = s.recv(256).split(b"\r\n")[0]
    assert banner == b"SSH-2.0-meshsshd_0.1"   # no JWT configured: no marker


def test_sessions_end_when_client_vanishes(world):
    srv, user, key, _ = world
    proc = subprocess.Popen(srv.ssh_argv(user.pw_name, key, "sleep 1000; echo never"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not _user_procs(user, "sleep 1000"):
        assert time.monotonic() < deadline, "remote sleep never started"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _user_procs(user, "sleep 1000"):
        assert time.monotonic() < deadline, "process group survived the client"
        time.sleep(0.1)


def _user_procs(user, needle):
    r = subprocess.run(["pgrep", "-u", str(user.pw_uid), "-f", needle], capture_output=True, text=True)
    return r.stdout.split()


def test_owner_of_pty_device_is_user(world):
    srv, user, key, _ = world
    r = run(srv, user, key, "stat -c '%U %G %a' $(tty)", opts=["-tt"])
    owner, group, mode = r.stdout.decode().split()
    assert owner == user.pw_name and group == "tty" and mode == "620"
    assert pwd.getpwnam(owner).pw_uid == user.pw_uid


def test_unix_socket_forwarding_is_refused(world, tmp_path):
    srv, user, key, _ = world
    remote_sock = f"/tmp/meshsshd-test-{os.getpid()}.sock"
    p = _background_ssh(srv, user, key, ["-R", f"{remote_sock}:127.0.0.1:1"])
    assert p.wait(20) == 255
    assert not os.path.exists(remote_sock)
    local_sock = tmp_path / "l.sock"
    p = _background_ssh(srv, user, key, ["-L", f"{local_sock}:/run/some.sock"])
    try:
        deadline = time.monotonic() + 10
        while not local_sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(local_sock))
            s.settimeout(10)
            assert s.recv(10) == b""    # the server refused the streamlocal channel
    finally:
        _stop(p)


def test_input_to_a_command_that_already_exited_does_not_hurt_the_server(world):
    """Writing to the stdin pipe of an exited child gives EPIPE, never SIGPIPE."""
    srv, user, key, _ = world
    for _ in range(3):
        r = run(srv, user, key, "exit 0", input=b"x" * 2_000_000)
        assert r.returncode == 0
    assert srv.proc.popen.poll() is None
    assert run(srv, user, key, "echo alive").stdout == b"alive\n"
