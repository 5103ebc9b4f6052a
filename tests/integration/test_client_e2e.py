"""meshssh and native OpenSSH against a real single-machine mesh.

One management server, five peers (`meshsshd up --dataplane none`), three users who
log in through the device flow's HTML form. Covers the client issue's list: meshssh
exec/PTY/exit codes/-L/-R/cp; OpenSSH through the installed drop-in (ssh, ssh -t, scp
both ways, sftp -b, -L, -R, -A, SendEnv, exit-signal); refusals with their messages.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import pty
import re
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.meshkit import Mesh
from tests.integration.serverkit import ServerKit, read_until
from tests.support import console_script, free_port, require_root, require_tool, stop_group, wait_for_port

pytestmark = [pytest.mark.root, pytest.mark.openssh]

ALICE = ("alice@example.com", "alice-password-1")
BOB = ("bob@example.com", "bob-password-12")
CAROL = ("carol@example.com", "carol-password-1")


class World:
    def __init__(self, mesh: Mesh, user: str, alice: Path, bob: Path, carol: Path) -> None:
        self.mesh = mesh
        self.user = user
        self.alice = alice
        self.bob = bob
        self.carol = carol
        self.laptop_ip = mesh.status("laptop")["mesh_ip"]
        self.db_ip = mesh.status("db-1")["mesh_ip"]

    def ms(self, *args: str, cfg: Path | None = None, **kw) -> subprocess.CompletedProcess:
        return self.mesh.meshssh(cfg or self.alice, *args, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, session_user) -> Iterator[World]:
    require_root()
    require_tool("ssh")
    mesh = Mesh(tmp_path_factory.mktemp("mesh")).start()
    try:
        for email, pw in (ALICE, BOB, CAROL):
            mesh.add_user(email, pw)
        for g, users in (("devs", [ALICE[0], CAROL[0]]), ("ops", [BOB[0]]), ("servers", []),
                         ("ops-servers", []), ("laptops", []), ("misc", [])):
            mesh.add_group(g, users)
        svc = mesh.api("POST", "/api/users", {"email": "ci@example.com", "service": True})
        mesh.add_ssh_policy("ci-ssh", ["user:ci@example.com", "laptops"], ["servers"])
        mesh.add_ssh_policy("devs-ssh", ["devs", "laptops"], ["servers"])
        mesh.add_ssh_policy("ops-ssh", ["ops", "laptops"], ["ops-servers"])
        full = ("--allow-server-ssh", "--enable-ssh-sftp", "--enable-ssh-local-port-forwarding",
                "--enable-ssh-remote-port-forwarding")
        mesh.add_peer("db-1", mesh.setup_key("servers"), *full, wait=None)
        mesh.add_peer("imp-1", mesh.setup_key("servers"), "--allow-server-ssh", wait=None)
        mesh.add_peer("web-1", mesh.setup_key("ops-servers"), "--allow-server-ssh", wait=None)
        mesh.add_peer("cache-1", mesh.setup_key("misc"), "--allow-server-ssh", wait=None)
        mesh.add_peer("laptop", mesh.setup_key("laptops"), wait=None)
        mesh.add_peer("open-1", mesh.setup_key("servers"), "--allow-server-ssh", "--disable-ssh-auth",
                      wait=None)
        for name in ("db-1", "imp-1", "web-1", "open-1"):
            mesh.wait_status(name, "serving")
        for name in ("cache-1", "laptop"):
            mesh.wait_status(name, None)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(mesh.login, *who) for who in (ALICE, BOB, CAROL)]
            alice, bob, carol = (f.result() for f in futs)
        w = World(mesh, session_user.pw_name, alice, bob, carol)
        w.service = (svc["client_id"], svc["client_secret"])
        yield w
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ meshssh itself

def test_login_stored_private(world: World) -> None:
    for name in ("login.json", "access.json"):
        mode = (world.alice / name).stat().st_mode & 0o777
        assert mode == 0o600, (name, oct(mode))
    doc = json.loads((world.alice / "login.json").read_text())
    assert doc["management_url"] == world.mesh.url and doc["refresh_token"]


def test_exec_binary_streams_and_exit_code(world: World) -> None:
    data = os.urandom(3 * 1024 * 1024)
    r = world.ms(f"{world.user}@db-1", "cat; printf 'to stderr' >&2; exit 7", input=data)
    assert r.returncode == 7, r.stderr
    assert sha(r.stdout) == sha(data)
    assert r.stderr == b"to stderr"


def test_exec_sees_source_peer_and_host_forms(world: World) -> None:
    for host in ("db-1", "db-1.mesh.internal", world.db_ip):
        r = world.ms("-l", world.user, host, "echo", "$SSH_CLIENT")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0].decode() == world.laptop_ip


def test_a_refused_source_address_is_named_with_the_options_that_choose_one(world: World) -> None:
    """127.0.0.1 is no mesh peer: the peer says which address it refused, and meshssh
    says where the connection came from and how to connect from one's own peer."""
    r = world.ms("-b", "127.0.0.1", f"{world.user}@db-1", "true")
    assert r.returncode == 255
    assert b"your address 127.0.0.1 may not log in to this peer" in r.stderr, r.stderr
    assert b"the connection came from 127.0.0.1" in r.stderr, r.stderr
    assert b"-b ADDRESS, MESHSSH_SOURCE_ADDRESS" in r.stderr, r.stderr


def test_exit_signal_is_255(world: World) -> None:
    r = world.ms(f"{world.user}@db-1", "kill -TERM $$")
    assert r.returncode == 255


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _interactive(argv: list[str], env: dict) -> None:
    """Drive a login shell in a real pseudo-terminal: size, resize, exit code, and the
    local terminal's settings afterwards."""
    master, slave = pty.openpty()
    _set_size(slave, 30, 100)
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    try:
        read_until(master, re.escape(b"$ "))  # the login shell's prompt: typeahead before it may be flushed
        os.write(master, b"stty size; tty\n")
        _, out = read_until(master, rb"/dev/pts/")
        assert b"30 100" in out
        _set_size(master, 40, 120)  # the kernel sends the client SIGWINCH → window-change
        # The change travels client → (proxy →) peer asynchronously: ask until it arrived.
        seen = b""
        deadline = time.monotonic() + 20
        while b"40 120" not in seen and time.monotonic() < deadline:
            os.write(master, b"stty size\n")
            try:
                seen += read_until(master, rb"40 120", timeout=1.0)[1]
            except AssertionError:
                continue
        assert b"40 120" in seen
        os.write(master, b"exit 3\n")
        assert proc.wait(15) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        after = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    assert after == before, "the client left the terminal in raw mode"


def test_pty_shell_resize_and_terminal_restored(world: World) -> None:
    env = world.mesh.client_env(world.alice, TERM="xterm")
    _interactive([console_script("meshssh"), f"{world.user}@db-1"], env)


class EchoServer:
    """A TCP echo server on loopback, for forwarding tests."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c: socket.socket) -> None:
        with c:
            while data := c.recv(65536):
                c.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    e = EchoServer()
    yield e
    e.close()


def _recv_all(s: socket.socket) -> bytes:
    """Everything the peer sends until it closes its side."""
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


def _echo_through(port: int, payload: bytes = b"ping through the mesh") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return _recv_all(s)


REMOTE_ECHO_CLIENT = ("python3 -c 'import socket,sys; s=socket.create_connection((\"127.0.0.1\",{port}));"
                      "s.sendall(b\"via -R\"); s.shutdown(1); print(s.recv(100).decode())'")


def _background(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def test_meshssh_local_forward(world: World, echo: EchoServer) -> None:
    lport = free_port()
    proc = _background([console_script("meshssh"), "-N", "-L", f"{lport}:127.0.0.1:{echo.port}",
                        f"{world.user}@db-1"], world.mesh.client_env(world.alice))
    try:
        wait_for_port("127.0.0.1", lport, proc=proc)
        assert _echo_through(lport) == b"ping through the mesh"
    finally:
        stop_group(proc)


def _socks_echo(socks_port: int, dest_port: int, payload: bytes = b"via socks") -> bytes:
    """A minimal SOCKS5 CONNECT (no auth) to 127.0.0.1:dest_port, then echo a payload."""
    with socket.create_connection(("127.0.0.1", socks_port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + dest_port.to_bytes(2, "big"))
        reply = s.recv(10)
        assert reply[:2] == b"\x05\x00", reply
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return _recv_all(s)


@pytest.mark.parametrize("client", ["meshssh", "openssh"])
def test_dynamic_forward(world: World, dropin: Path, echo: EchoServer, client: str) -> None:
    dport = free_port()
    env = world.mesh.client_env(world.alice)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    head = [console_script("meshssh")] if client == "meshssh" else [require_tool("ssh"), "-F", str(dropin)]
    proc = _background([*head, "-N", "-D", f"127.0.0.1:{dport}", f"{world.user}@db-1"], env)
    try:
        wait_for_port("127.0.0.1", dport, proc=proc)
        assert _socks_echo(dport, echo.port) == b"via socks"
    finally:
        stop_group(proc)


def test_meshssh_remote_forward(world: World, echo: EchoServer) -> None:
    rport = free_port()
    r = world.ms("-R", f"127.0.0.1:{rport}:127.0.0.1:{echo.port}", f"{world.user}@db-1",
                 REMOTE_ECHO_CLIENT.format(port=rport))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"via -R"


def test_meshssh_remote_forward_port_zero_is_reported(world: World, echo: EchoServer) -> None:
    r = world.ms("-R", f"0:127.0.0.1:{echo.port}", f"{world.user}@db-1", "true")
    assert r.returncode == 0, r.stderr
    assert b"Allocated port" in r.stderr


# imp-1 serves SSH without --enable-ssh-local/remote-port-forwarding.
LOCAL_OFF = "local port forwarding is disabled on this peer (meshsshd up --enable-ssh-local-port-forwarding)"
REMOTE_OFF = "remote port forwarding is disabled on this peer (meshsshd up --enable-ssh-remote-port-forwarding)"


def _refused_through(argv: list[str], env: dict) -> str:
    """Start a -L, send one connection through it, and return the client's stderr."""
    lport = int(argv[argv.index("-L") + 1].split(":")[0])
    proc = _background(argv, env)
    try:
        wait_for_port("127.0.0.1", lport, proc=proc)
        with socket.create_connection(("127.0.0.1", lport), timeout=10) as s:
            s.settimeout(10)
            assert s.recv(10) == b""
    finally:
        stop_group(proc)
    return proc.stderr.read().decode(errors="replace")


def test_meshssh_says_why_a_forward_is_refused(world: World) -> None:
    r = world.ms("-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{free_port()}:127.0.0.1:9",
                 f"{world.user}@imp-1", "true")
    assert r.returncode == 255, r.stderr
    assert REMOTE_OFF in r.stderr.decode(), r.stderr
    err = _refused_through([console_script("meshssh"), "-N", "-L", f"{free_port()}:127.0.0.1:9",
                            f"{world.user}@imp-1"], world.mesh.client_env(world.alice))
    assert f"open failed: administratively prohibited: {LOCAL_OFF}" in err, err
    dport = free_port()   # -D: the SOCKS client sees its connection closed, the user the reason
    proc = _background([console_script("meshssh"), "-N", "-D", f"127.0.0.1:{dport}", f"{world.user}@imp-1"],
                       world.mesh.client_env(world.alice))
    try:
        wait_for_port("127.0.0.1", dport, proc=proc)
        with socket.create_connection(("127.0.0.1", dport), timeout=10) as s:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + (9).to_bytes(2, "big"))
            s.settimeout(10)
            _recv_all(s)   # asyncssh answers SOCKS before the channel opens, then closes
    finally:
        stop_group(proc)
    err = proc.stderr.read().decode(errors="replace")
    assert f"dynamic forward {dport} to 127.0.0.1:9: open failed: administratively prohibited: {LOCAL_OFF}" in err, err


def test_peers_lists_under_a_header_and_says_why_when_empty(world: World, tmp_path: Path) -> None:
    r = world.ms("peers")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "MESH", "IP", "FQDN", "SSH", "USERS"]
    db = next(line for line in lines if line.startswith("db-1 "))
    assert db.split()[1] == world.db_ip and db.split()[3] == "ssh"
    world.mesh.add_user("nobody-yet@example.com", "pw-nobody-yet-1")
    cfg = world.mesh.login("nobody-yet@example.com", "pw-nobody-yet-1")
    r = world.ms("peers", cfg=cfg)
    assert r.returncode == 0 and r.stdout == b"", r
    assert b"No peers: no policy on " in r.stderr and b"lets nobody-yet@example.com reach a peer yet" in r.stderr



def test_config_file_gives_defaults_and_names_its_mistakes(world: World) -> None:
    """config.toml's `user` is the login name when none is given (ssh_config's `User`);
    a wrong key or value is refused with the file and key named."""
    conf = world.alice / "config.toml"
    try:
        conf.write_text(f'user = "{world.user}"\n')
        r = world.ms("db-1", "id -un")
        assert r.returncode == 0 and r.stdout.decode().strip() == world.user, r.stderr
        r = world.ms("root@db-1", "id -un")   # the command line still wins
        assert r.returncode == 255 and b"root login is disabled" in r.stderr, r.stderr
        conf.write_text('usr = "x"\n')
        r = world.ms("db-1", "true")
        assert r.returncode == 255
        assert f"{conf}: unknown key `usr` (did you mean `user`?)".encode() in r.stderr, r.stderr
        conf.write_text("control_persist = -5\n")
        r = world.ms("db-1", "true")
        assert r.returncode == 255 and b"key `control_persist`: expected `float` >= 0.0" in r.stderr, r.stderr
    finally:
        conf.unlink(missing_ok=True)


def test_cp_both_ways_with_progress(world: World, tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("deep")
    remote_dir = f"/tmp/meshssh-cp-{os.getpid()}"
    assert world.ms(f"{world.user}@db-1", f"mkdir -p {remote_dir}").returncode == 0
    try:
        # Upload under a pseudo-terminal so that the progress bar is drawn.
        master, slave = pty.openpty()
        env = world.mesh.client_env(world.alice)
        proc = subprocess.Popen([console_script("meshssh"), "cp", "-r", str(src), str(tree),
                                 f"{world.user}@db-1:{remote_dir}/"], stdin=subprocess.DEVNULL,
                                stdout=slave, stderr=slave, env=env)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(30) == 0, out
        os.close(master)
        assert b"blob.bin" in out and b"MB" in out, out  # rich's bar: name, sizes
        back = tmp_path / "back"
        back.mkdir()
        r = world.ms("cp", "-r", f"{world.user}@db-1:{remote_dir}/blob.bin",
                     f"{world.user}@db-1:{remote_dir}/tree", str(back))
        assert r.returncode == 0, r.stderr
        assert r.stdout == b""  # no terminal, no progress bar
        assert sha((back / "blob.bin").read_bytes()) == sha(data)
        assert (back / "tree" / "sub" / "f.txt").read_text() == "deep"
        r = world.ms("cp", str(tree), f"{world.user}@db-1:{remote_dir}/")
        assert r.returncode != 0 and b"use -r" in r.stderr
    finally:
        world.ms(f"{world.user}@db-1", f"rm -rf {remote_dir}")



def test_cp_errors_name_the_path(world: World, tmp_path: Path) -> None:
    """Every failure names the path it is about, local or `host:path`, and nothing
    crashes (a missing local path used to end in `TypeError: can't concat str to bytes`)."""
    here = tmp_path / "here.txt"
    here.write_text("x")
    remote = f"{world.user}@db-1"
    cases = [
        (["cp", str(tmp_path / "missing.txt"), f"{remote}:/tmp/"],
         f"{tmp_path / 'missing.txt'}: No such file or directory"),
        (["cp", f"{remote}:/etc/hostname", str(tmp_path / "nodir" / "x")],
         f"{tmp_path / 'nodir'}: No such directory"),
        (["cp", f"{remote}:/etc/hostname", f"{remote}:/etc/passwd", str(tmp_path / "nodir2") + "/"],
         f"{tmp_path / 'nodir2'}/: No such directory"),
        (["cp", f"{remote}:/nonexistent-{os.getpid()}", str(tmp_path)],
         f"db-1:/nonexistent-{os.getpid()}: No such file"),
        (["cp", f"{remote}:/root/.profile", str(tmp_path)], "db-1:/root/.profile: Permission denied"),
        (["cp", str(here), f"{remote}:/nonexistent-{os.getpid()}/"],
         f"db-1:/nonexistent-{os.getpid()}/: No such directory"),
        (["cp", str(here), str(here), f"{remote}:/etc/hostname"], "db-1:/etc/hostname: Not a directory"),
    ]
    for argv, message in cases:
        r = world.ms(*argv)
        err = r.stderr.decode()
        assert r.returncode == 1 and f"meshssh: {message}" in err, (argv, err)
        assert "Traceback" not in err, err


# ------------------------------------------------------------------ OpenSSH + drop-in

@pytest.fixture(scope="module")
def dropin(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sshconf")
    r = world.ms("config", "install", "--path", str(d / "drop"))
    assert r.returncode == 0, r.stderr
    conf = d / "ssh_config"
    conf.write_text(f"Include {d / 'drop' / '99-meshssh.conf'}\n")
    return conf


def ossh(world: World, dropin: Path, *args: str, tool: str = "ssh", input: bytes | None = None,
         env_extra: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = world.mesh.client_env(world.alice, **(env_extra or {}))
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    return subprocess.run([require_tool(tool), "-F", str(dropin), *args], input=input,
                          capture_output=True, timeout=timeout, env=env)


def test_openssh_exec_exit_code(world: World, dropin: Path) -> None:
    r = ossh(world, dropin, f"{world.user}@db-1", "echo hi; echo oops >&2; exit 5")
    assert r.returncode == 5, r.stderr
    assert r.stdout == b"hi\n" and r.stderr == b"oops\n"


def test_openssh_pty(world: World, dropin: Path) -> None:
    r = ossh(world, dropin, "-tt", f"{world.user}@db-1", "tty; stty size")
    assert r.returncode == 0, r.stderr
    assert b"/dev/pts/" in r.stdout


def test_openssh_interactive_through_proxy(world: World, dropin: Path) -> None:
    env = world.mesh.client_env(world.alice, TERM="xterm")
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    _interactive([require_tool("ssh"), "-F", str(dropin), "-t", f"{world.user}@db-1"], env)


def test_openssh_sftp_refused_where_disabled(world: World, tmp_path: Path) -> None:
    """web-1 runs without --enable-ssh-sftp: the refusal reaches OpenSSH as a failed
    subsystem request, and meshssh cp says what to turn on."""
    d = tmp_path / "bobdrop"
    r = world.ms("config", "install", "--path", str(d), cfg=world.bob)
    assert r.returncode == 0, r.stderr
    conf = tmp_path / "bob_ssh_config"
    conf.write_text(f"Include {d / '99-meshssh.conf'}\n")
    env = world.mesh.client_env(world.bob)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    r = subprocess.run([require_tool("sftp"), "-F", str(conf), "-b", "/dev/null", f"{world.user}@web-1"],
                       capture_output=True, timeout=60, env=env)
    assert r.returncode != 0
    assert b"subsystem" in r.stderr.lower(), r.stderr
    r = subprocess.run([require_tool("ssh"), "-F", str(conf), f"{world.user}@web-1", "echo shell-ok"],
                       capture_output=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout == b"shell-ok\n", r.stderr  # sessions still work
    r = world.ms("cp", str(conf), f"{world.user}@web-1:/tmp/", cfg=world.bob)
    assert r.returncode != 0 and b"--enable-ssh-sftp" in r.stderr, r.stderr


def test_openssh_scp_both_ways_and_sftp_batch(world: World, dropin: Path, tmp_path: Path) -> None:
    data = os.urandom(4 * 1024 * 1024 + 17)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    remote = f"/tmp/meshssh-scp-{os.getpid()}.bin"
    try:
        r = ossh(world, dropin, str(src), f"{world.user}@db-1:{remote}", tool="scp")
        assert r.returncode == 0, r.stderr
        down = tmp_path / "down.bin"
        r = ossh(world, dropin, f"{world.user}@db-1:{remote}", str(down), tool="scp")
        assert r.returncode == 0, r.stderr
        assert sha(down.read_bytes()) == sha(data)
        batch = tmp_path / "batch"
        batch.write_text(f"ls -l {remote}\nget {remote} {tmp_path / 'sftp.bin'}\nrm {remote}\n")
        r = ossh(world, dropin, "-b", str(batch), f"{world.user}@db-1", tool="sftp")
        assert r.returncode == 0, r.stderr
        assert sha((tmp_path / "sftp.bin").read_bytes()) == sha(data)
    finally:
        world.ms(f"{world.user}@db-1", f"rm -f {remote}")


def test_openssh_local_and_remote_forward(world: World, dropin: Path, echo: EchoServer) -> None:
    rport = free_port()
    r = ossh(world, dropin, "-R", f"127.0.0.1:{rport}:127.0.0.1:{echo.port}", f"{world.user}@db-1",
             REMOTE_ECHO_CLIENT.format(port=rport))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"via -R"
    lport = free_port()
    env = world.mesh.client_env(world.alice)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    proc = _background([require_tool("ssh"), "-F", str(dropin), "-N", "-L",
                        f"{lport}:127.0.0.1:{echo.port}", f"{world.user}@db-1"], env)
    try:
        wait_for_port("127.0.0.1", lport, proc=proc)
        assert _echo_through(lport) == b"ping through the mesh"
    finally:
        stop_group(proc)


def test_openssh_says_why_a_forward_is_refused(world: World, dropin: Path) -> None:
    """Through the proxy: OpenSSH prints the -L refusal itself; a -R refusal is printed by
    the proxy and relayed to `ssh -v` as "Remote: ..."."""
    rport = free_port()
    r = ossh(world, dropin, "-v", "-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{rport}:127.0.0.1:9",
             f"{world.user}@imp-1", "true")
    err = r.stderr.decode()
    assert r.returncode == 255, err
    assert f"meshssh: imp-1: remote forward 127.0.0.1:{rport} refused: {REMOTE_OFF}" in err, err
    assert f"Remote: meshsshd: {REMOTE_OFF}" in err, err
    env = world.mesh.client_env(world.alice)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    err = _refused_through([require_tool("ssh"), "-F", str(dropin), "-N", "-L", f"{free_port()}:127.0.0.1:9",
                            f"{world.user}@imp-1"], env)
    assert f"open failed: administratively prohibited: {LOCAL_OFF}" in err, err


def test_openssh_agent_forwarding(world: World, dropin: Path, tmp_path: Path) -> None:
    require_tool("ssh-agent")
    key = tmp_path / "agentkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "meshssh-agent-test",
                    "-f", str(key)], check=True)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        for _ in range(50):  # the socket file exists a moment before the agent listens
            if subprocess.run(["ssh-add", "-q", str(key)], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("ssh-agent did not take the key")
        pub = (tmp_path / "agentkey.pub").read_text().split()[1].encode()
        r = ossh(world, dropin, "-A", f"{world.user}@db-1", "ssh-add -L",
                 env_extra={"SSH_AUTH_SOCK": str(sock)})
        assert r.returncode == 0, r.stderr
        assert pub in r.stdout
        r = ossh(world, dropin, f"{world.user}@db-1", 'echo "[$SSH_AUTH_SOCK]"',
                 env_extra={"SSH_AUTH_SOCK": str(sock)})
        assert r.stdout.strip() == b"[]"  # no -A, no agent on the far side
        r = world.ms("-A", f"{world.user}@db-1", "ssh-add -L", SSH_AUTH_SOCK=str(sock))
        assert r.returncode == 0 and pub in r.stdout, r.stderr
    finally:
        agent.kill()
        agent.wait()


def test_openssh_sendenv(world: World, dropin: Path) -> None:
    r = ossh(world, dropin, "-o", "SendEnv=LC_MESHTEST", f"{world.user}@db-1", 'echo "[$LC_MESHTEST]"',
             env_extra={"LC_MESHTEST": "from-the-client"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"[from-the-client]"


def test_openssh_exit_signal(world: World, dropin: Path) -> None:
    r = ossh(world, dropin, f"{world.user}@db-1", "kill -KILL $$")
    assert r.returncode == 255


def test_direct_openssh_to_a_no_jwt_peer_is_still_key_checked(world: World, dropin: Path,
                                                             tmp_path: Path) -> None:
    """open-1 runs --disable-ssh-auth: detect exits 1, so ssh goes direct — and still
    checks the key against the managed known_hosts file: no prompt, no TOFU."""
    ip = world.mesh.status("open-1")["mesh_ip"]
    assert subprocess.run([console_script("meshssh"), "detect", ip, "22022"]).returncode == 1
    r = ossh(world, dropin, "-o", "BatchMode=yes", "-o", "LogLevel=INFO", f"{world.user}@open-1", "true")
    assert b"Host key verification failed" not in r.stderr, r.stderr
    assert b"Permanently added" not in r.stderr and b"authenticity" not in r.stderr, r.stderr
    # Same drop-in, but the managed file holds another key for open-1: OpenSSH refuses.
    import asyncssh

    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[1]
    src = Path(str(dropin.read_text().split()[1])).parent
    bad = tmp_path / "bad"
    bad.mkdir()
    kh = (src / "99-meshssh.known_hosts").read_text().splitlines()
    kh = [line.rsplit(" ", 1)[0] + " " + other if "open-1" in line else line for line in kh]
    (bad / "99-meshssh.known_hosts").write_text("\n".join(kh) + "\n")
    (bad / "99-meshssh.conf").write_text((src / "99-meshssh.conf").read_text().replace(str(src), str(bad)))
    conf = tmp_path / "cfg"
    conf.write_text(f"Include {bad / '99-meshssh.conf'}\n")
    r = ossh(world, conf, "-o", "BatchMode=yes", f"{world.user}@open-1", "true")
    assert r.returncode == 255
    assert b"Host key verification failed" in r.stderr or b"HOST IDENTIFICATION HAS CHANGED" in r.stderr, r.stderr


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_proxy_flow_control_bounds_memory(world: World, dropin: Path) -> None:
    """A reader that stalls must stall the peer, not fill the proxy's memory: 200 MB
    downloaded through ssh → proxy while nobody reads, then drained completely."""
    size = 200 * 1024 * 1024
    env = world.mesh.client_env(world.alice)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    proc = subprocess.Popen([require_tool("ssh"), "-F", str(dropin), f"{world.user}@db-1",
                             f"head -c {size} /dev/zero"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        proxy = None
        deadline = time.monotonic() + 30
        while proxy is None and time.monotonic() < deadline:
            for kid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                try:  # ssh's children: first `meshssh detect` (Match exec), then the proxy
                    if b"proxy" in Path(f"/proc/{kid}/cmdline").read_bytes():
                        proxy = int(kid)
                except OSError:
                    continue
            time.sleep(0.1)
        assert proxy is not None
        time.sleep(3)  # nobody reads: every buffer on the way fills up
        rss = _rss_kb(proxy)
        assert 0 < rss < 150 * 1024, f"proxy grew to {rss} KB while the reader stalled"
        assert proc.stdout is not None
        total = 0
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else b""
        assert total == size
    finally:
        stop_group(proc)


def test_openssh_through_proxy_timing(world: World, dropin: Path) -> None:
    """`ssh host true` through detect + proxy: measured for the report, bounded generously."""
    times = []
    for _ in range(5):
        t0 = time.monotonic()
        r = ossh(world, dropin, f"{world.user}@db-1", "true")
        times.append(time.monotonic() - t0)
        assert r.returncode == 0, r.stderr
    print(f"ssh host true via drop-in: min {min(times):.3f}s median {sorted(times)[2]:.3f}s")
    assert sorted(times)[2] < 10


# ------------------------------------------------------------------ refusals

def test_not_logged_in(world: World, dropin: Path, tmp_path: Path) -> None:
    empty = tmp_path / "nologin"
    r = world.mesh.meshssh(empty, f"{world.user}@db-1", "true")
    assert r.returncode == 255
    assert b"not logged in \xe2\x80\x94 run `meshssh login`" in r.stderr
    r = ossh(world, dropin, f"{world.user}@db-1", "true", env_extra={"MESHSSH_CONFIG_DIR": str(empty)})
    assert r.returncode == 255
    assert b"not logged in" in r.stderr


def test_no_policy(world: World) -> None:
    r = world.ms(f"{world.user}@web-1", "true")
    assert r.returncode == 255
    assert b"no policy lets alice@example.com reach web-1" in r.stderr
    r = world.ms(f"{world.user}@web-1", "true", cfg=world.bob)  # bob's policy does allow it
    assert r.returncode == 0, r.stderr


def test_not_ssh_enabled(world: World) -> None:
    r = world.ms(f"{world.user}@cache-1", "true")
    assert r.returncode == 255
    # the cause, with its fix: cache-1's only group ("misc") is in no policy
    assert b"cache-1 is not SSH-enabled: no policy grants SSH to cache-1 (an admin adds one" in r.stderr, r.stderr



def test_a_refused_token_is_not_sent_again(world: World) -> None:
    """A token the peer checked and then refused (here: root login is off) is spent there
    (its jti is kept); re-sending it from the cache made every later try a "replayed"
    refusal, which should mean an attack."""
    log = world.mesh.dir / "peer-db-1.log"
    before = log.read_text().count('"replayed"')
    for _ in range(3):
        r = world.ms("root@db-1", "true")
        assert r.returncode == 255 and b"root login is disabled on this peer" in r.stderr, r.stderr
    assert log.read_text().count('"replayed"') == before


def test_wrong_host_key(world: World, dropin: Path, tmp_path: Path) -> None:
    """An impostor on imp-1's address with other host keys: refused loudly, both ways."""
    ip = world.mesh.status("imp-1")["mesh_ip"]
    world.mesh.stop_peer("imp-1")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": []}))
    kit = ServerKit(tmp_path / "impostor", {
        "listen": [f"{ip}:22022"],
        "jwt": {"issuer": "https://impostor.invalid", "audience": "x", "jwks_file": str(jwks)},
    }, host=ip)
    kit.port = 22022
    with kit:
        r = world.ms(f"{world.user}@imp-1", "true")
        assert r.returncode == 255
        assert b"DOES NOT MATCH" in r.stderr and b"Refusing to connect" in r.stderr, r.stderr
        r = ossh(world, dropin, f"{world.user}@imp-1", "true")
        assert r.returncode == 255
        assert b"DOES NOT MATCH" in r.stderr, r.stderr
        log = kit.output()
    # The impostor never saw a login attempt (no token was sent before the key check).
    assert '"event":"auth.' not in log, log[-2000:]


def test_stale_cached_host_key_is_refetched_not_trusted(world: World, dropin: Path) -> None:
    """A peer list cached before a key rotation: the mismatch makes meshssh (and the
    proxy) ask management again once, and the connection goes on with the current key."""
    import asyncssh

    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    peers_file = world.alice / "peers.json"
    for run in (lambda: world.ms(f"{world.user}@db-1", "echo fresh"),
                lambda: ossh(world, dropin, f"{world.user}@db-1", "echo fresh")):
        assert world.ms("peers").returncode == 0  # fills the cache
        doc = json.loads(peers_file.read_text())
        for p in doc["peers"]:
            if p["name"] == "db-1":
                p["ssh_host_keys"] = [other]
        doc["fetched"] = time.time()
        peers_file.write_text(json.dumps(doc))
        r = run()
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"fresh\n"
        assert other not in peers_file.read_text()  # the refetched list replaced the stale one


def test_cached_ssh_token_expired_or_refused_is_replaced(world: World) -> None:
    peer_id = world.mesh.status("db-1")["peer_id"]
    cache = world.alice / "ssh-tokens.json"
    now = time.time()
    for entry in ({"token": "expired.token.value", "exp": now - 5, "stored": now - 70},
                  # looks fresh to the client, but the peer refuses it: one fresh retry
                  {"token": "eyJhbGciOiJub25lIn0.eyJleHAiOjF9.bogus", "exp": now + 50, "stored": now}):
        cache.write_text(json.dumps({"management_url": world.mesh.url, "entries": {peer_id: entry}}))
        world.ms("control", "stop")  # a pooled login would not need a token at all
        r = world.ms(f"{world.user}@db-1", "echo ok")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"ok\n"
        assert r.stderr == b""  # the peer's refusal of the stale token is not shown
        left = json.loads(cache.read_text())["entries"]
        assert left.get(peer_id, {}).get("token") != entry["token"]


def test_no_cache_flag_and_ttl_zero_store_nothing(world: World) -> None:
    cache = world.alice / "ssh-tokens.json"
    cache.unlink(missing_ok=True)
    r = world.ms("--ssh-jwt-cache-ttl", "0", f"{world.user}@db-1", "true")
    assert r.returncode == 0, r.stderr
    entries = json.loads(cache.read_text())["entries"] if cache.exists() else {}
    assert entries == {}


def test_revoked_login_names_the_fix(world: World) -> None:
    """Refresh tokens rotate: an old one is refused, and the user is told to log in."""
    old = (world.carol / "login.json").read_bytes()
    (world.carol / "access.json").unlink()  # force a refresh (rotation)
    r = world.ms(f"{world.user}@db-1", "true", cfg=world.carol)
    assert r.returncode == 0, r.stderr
    assert (world.carol / "login.json").read_bytes() != old  # rotated and stored
    assert (world.carol / "login.json").stat().st_mode & 0o777 == 0o600
    (world.carol / "login.json").write_bytes(old)  # the spent refresh token comes back
    (world.carol / "access.json").unlink()
    r = world.ms(f"{world.user}@db-1", "true", cfg=world.carol)
    assert r.returncode == 255
    assert b"no longer valid" in r.stderr and r.stderr.count(b"run `meshssh login`") == 1, r.stderr


def test_logout(world: World) -> None:
    cfg = world.carol
    r = world.ms("logout", cfg=cfg)
    assert r.returncode == 0
    assert not (cfg / "login.json").exists() and not (cfg / "access.json").exists()
    r = world.ms(f"{world.user}@db-1", "true", cfg=cfg)
    assert r.returncode == 255 and b"not logged in" in r.stderr


# ------------------------------------------------------------------ detect

class BannerServer:
    """A TCP server that sends `banner` (or nothing) and records whatever it receives."""

    def __init__(self, banner: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.banner = banner
        self.received = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            c, _ = self.sock.accept()
        except OSError:
            return
        with c:
            if self.banner is not None:
                c.sendall(self.banner)
            c.settimeout(2)
            try:
                self.received += c.recv(100)
            except OSError:
                pass


@pytest.mark.parametrize("banner, code", [
    pytest.param(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n", 2, id="openssh"),
    pytest.param(b"hello\r\nSSH-2.0-meshsshd_0.1 meshsshd-jwt\r\n", 0, id="pre-banner-lines"),
    pytest.param(b"HTTP/1.0 400\r\n\r\n", 2, id="not-ssh"),
    pytest.param(None, 2, id="silent-times-out"),
])
def test_detect_reads_only(banner: bytes | None, code: int) -> None:
    srv = BannerServer(banner)
    try:
        wait = "1" if banner is None else "10"  # generous: a loaded CI box is slow to schedule
        r = subprocess.run([console_script("meshssh"), "detect", "--timeout", wait, "127.0.0.1",
                            str(srv.port)], capture_output=True, timeout=30)
        assert r.returncode == code
        srv.thread.join(5)
        assert srv.received == b""  # detect sends nothing
    finally:
        srv.sock.close()


def test_detect_real_servers(world: World, tmp_path: Path) -> None:
    det = [console_script("meshssh"), "detect"]
    assert subprocess.run([*det, world.db_ip, "22022"]).returncode == 0
    assert subprocess.run([*det, "127.0.0.1", str(free_port())]).returncode == 2  # closed port
    with ServerKit(tmp_path / "noauth", {"disable_auth": True, "access": [
            {"sources": ["127.0.0.0/8"], "identities": ["*"], "local_users": ["*"]}]}) as kit:
        assert subprocess.run([*det, kit.host, str(kit.port)]).returncode == 1


# ------------------------------------------------------------------ service users, user-level install

def test_service_user_login(world: World, tmp_path: Path) -> None:
    client_id, secret = world.service
    sfile = tmp_path / "secret"
    sfile.write_text(secret + "\n")
    cfg = tmp_path / "svc"
    r = world.ms("login", "--management-url", world.mesh.url, "--client-id", client_id,
                 "--client-secret-file", str(sfile), cfg=cfg)
    assert r.returncode == 0, r.stderr
    assert b"ci@example.com" in r.stderr
    assert secret not in (cfg / "access.json").read_text()
    (cfg / "access.json").unlink()  # next use takes a new token with the stored secret
    r = world.ms(f"{world.user}@db-1", "echo svc-ok", cfg=cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"svc-ok\n"
    sfile.write_text("wrong")
    r = world.ms("login", "--management-url", world.mesh.url, "--client-id", client_id,
                 "--client-secret-file", str(sfile), cfg=tmp_path / "svc2")
    assert r.returncode != 0 and b"meshssh login" in r.stderr


def test_user_level_install_and_remove(world: World, tmp_path: Path) -> None:
    """The per-user install (what a non-root user gets; root asks for it with
    MESHSSH_INSTALL_SCOPE=user): drop-in in ~/.ssh/config.d/, an Include line on top of
    ~/.ssh/config, and that config then routes plain `ssh peer` through meshssh."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    user_config = home / ".ssh" / "config"
    original = "Host example-unrelated\n    User nobody\n"
    user_config.write_text(original)
    extra = {"HOME": str(home), "MESHSSH_INSTALL_SCOPE": "user"}
    r = world.ms("config", "install", **extra)
    assert r.returncode == 0, r.stderr
    dropin = home / ".ssh" / "config.d" / "99-meshssh.conf"
    text = user_config.read_text()
    assert text.startswith("# added by") and f"Include {dropin}" in text
    assert text.index("Include") < text.index("Host example-unrelated")
    assert dropin.exists() and b"Include" in r.stderr
    r = ossh(world, user_config, f"{world.user}@db-1", "echo via-user-include")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"via-user-include\n"
    r = world.ms("config", "remove", **extra)
    assert r.returncode == 0, r.stderr
    assert user_config.read_text() == original
    assert not dropin.exists()


def test_refresh_rewrites_only_an_installed_dropin(world: World, tmp_path: Path) -> None:
    d = tmp_path / "drop"
    r = world.ms("config", "install", "--refresh", "--path", str(d))
    assert r.returncode == 0 and not (d / "99-meshssh.conf").exists()
    assert world.ms("config", "install", "--path", str(d)).returncode == 0
    (d / "99-meshssh.conf").write_text("# stale\n")
    r = world.ms("config", "install", "--refresh", "--path", str(d))
    assert r.returncode == 0 and r.stderr == b""
    assert "Match host" in (d / "99-meshssh.conf").read_text()


# ------------------------------------------------------------------ the proxy with another client

async def test_proxy_relays_signals_modes_env_for_any_client(world: World) -> None:
    """OpenSSH never sends `signal` requests; other clients do (asyncssh here, through
    the same `meshssh proxy`). The proxy must relay them, the terminal modes, env and
    the exact exit-signal."""
    import asyncssh

    env = world.mesh.client_env(world.alice)
    cmd = f"env MESHSSH_CONFIG_DIR={env['MESHSSH_CONFIG_DIR']} MESHSSHD_STATUS_FILE=" \
          f"{env['MESHSSHD_STATUS_FILE']} {console_script('meshssh')} proxy --user {world.user} db-1 22022"
    async with asyncssh.connect("db-1", 22022, username=world.user, known_hosts=None,
                                proxy_command=cmd, config=None, client_keys=None,
                                agent_path=None) as conn:
        proc = await conn.create_process("echo ready; sleep 30", encoding=None)
        assert await proc.stdout.readline() == b"ready\n"
        proc.send_signal("TERM")
        await proc.wait_closed()
        assert proc.exit_signal is not None and proc.exit_signal[0] == "TERM"
        r = await conn.run("stty -a; echo LC=$LC_MESHTEST", term_type="xterm", term_size=(91, 17),
                           term_modes={asyncssh.PTY_ECHO: 0}, env={"LC_MESHTEST": "relayed"},
                           request_pty="force", encoding="utf-8")
        assert "-echo " in r.stdout and "rows 17; columns 91" in r.stdout, r.stdout
        assert "LC=relayed" in r.stdout
        r = await conn.run("exit 42")
        assert r.exit_status == 42


def test_openssh_remote_forward_port_zero(world: World, dropin: Path, echo: EchoServer, tmp_path: Path) -> None:
    """`ssh -R 0:…`: the peer picks the port; OpenSSH must learn it through the proxy, and
    connections to it must come back (forwarded-tcpip names the allocated port)."""
    portfile = Path(f"/tmp/meshssh-rport-{os.getpid()}-{time.monotonic_ns()}")  # readable by the peer's user
    portfile.touch()
    portfile.chmod(0o644)
    remote = (f"while [ ! -s {portfile} ]; do sleep 0.1; done; "
              + REMOTE_ECHO_CLIENT.replace("{port}", f"int(open(\"{portfile}\").read())"))
    env = world.mesh.client_env(world.alice)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    proc = subprocess.Popen([require_tool("ssh"), "-F", str(dropin), "-o", "LogLevel=INFO",
                             "-R", f"0:127.0.0.1:{echo.port}", f"{world.user}@db-1", remote],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stderr is not None
        line = b""
        deadline = time.monotonic() + 30
        while b"Allocated port" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "ssh ended without reporting the allocated port"
        port = int(line.split()[2])
        portfile.write_text(str(port))
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip() == b"via -R"
    finally:
        stop_group(proc)
        portfile.unlink(missing_ok=True)



def test_zz_revoked_session_tells_the_user(world: World, tmp_path: Path) -> None:
    """Last in this module (bob leaves his group): a live session that policy no longer
    allows is closed by the peer, and both meshssh and ssh-through-the-proxy say why."""
    d = tmp_path / "bobdrop"
    assert world.ms("config", "install", "--path", str(d), cfg=world.bob).returncode == 0
    conf = tmp_path / "bob_ssh_config"
    conf.write_text(f"Include {d / '99-meshssh.conf'}\n")
    env = world.mesh.client_env(world.bob)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    remote = "echo started; sleep 60"
    procs = [_background([console_script("meshssh"), f"{world.user}@web-1", remote], env),
             _background([require_tool("ssh"), "-F", str(conf), f"{world.user}@web-1", remote], env)]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line != b"started\n":
                p.wait(30)
                raise AssertionError(p.stderr.read() if p.stderr else line)
        groups = world.mesh.api("GET", "/api/groups")
        groups = groups["groups"] if isinstance(groups, dict) else groups
        ops = next(g for g in groups if g["name"] == "ops")
        world.mesh.api("PUT", f"/api/groups/{ops['id']}", {"users": []})  # bob leaves ops
        for p in procs:
            _, err = p.communicate(timeout=30)
            assert p.returncode == 255
            assert b"revoked" in err, err
    finally:
        for p in procs:
            stop_group(p)
