"""The bench's world: a throwaway user with a client key, and the two servers under test.

`Workspace` owns a temp directory (root only), a throwaway OS user whose
~/.ssh/authorized_keys holds a freshly generated client key, and the servers it starts.
Everything is torn down in `close()`, which the CLI calls from `finally` and on SIGTERM,
so a Ctrl-C never leaves a user, a daemon or a temp file behind.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import CpuGroup, tree_cpu

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def venv_script(name: str) -> str:
    """The console script beside this interpreter (the project's venv), else PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (pip install -e .)")
    return found


@dataclass
class Server:
    """A started daemon: `pid` is the listening process whose tree we measure."""

    label: str  # "sshd" or "meshsshd"
    host: str
    port: int
    proc: subprocess.Popen
    log: Path
    cgroup: CpuGroup | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU used so far by the daemon and everything it ever forked."""
        if self.cgroup is not None:
            got = self.cgroup.seconds()
            if got is not None:
                return got
        return tree_cpu(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.cgroup is not None:
            self.cgroup.remove()


@dataclass
class Workspace:
    tmp: Path
    user: str = ""
    home: Path = Path("/")
    key: Path = Path("/")
    servers: dict[str, Server] = field(default_factory=dict)
    _closed: bool = False

    @classmethod
    def create(cls) -> Workspace:
        if os.geteuid() != 0:
            raise PermissionError("the benchmark needs root (throwaway user, sshd, meshsshd serve)")
        tmp = Path(tempfile.mkdtemp(prefix="meshbench-"))
        os.chmod(tmp, 0o711)
        ws = cls(tmp=tmp)
        try:
            ws._make_user()
        except BaseException:
            ws.close()
            raise
        return ws

    # --- user and key ---------------------------------------------------------------

    def _make_user(self) -> None:
        name = f"mbench{secrets.token_hex(3)}"
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        self.user = name
        subprocess.run(["usermod", "-p", "*", name], check=True)
        pw = pwd.getpwnam(name)
        self.home = Path(pw.pw_dir)
        self.key = self.tmp / "client_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "meshbench", "-f", str(self.key)],
            check=True,
        )
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        ak = ssh_dir / "authorized_keys"
        ak.write_text(Path(f"{self.key}.pub").read_text())
        os.chmod(ak, 0o600)
        for p in (ssh_dir, ak):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        # A world-readable scratch directory on tmpfs: sftp files never touch the disk.
        self.scratch = Path(tempfile.mkdtemp(prefix="meshbench-", dir="/dev/shm"))
        os.chmod(self.scratch, 0o755)
        self.user_scratch = self.scratch / "user"
        self.user_scratch.mkdir(mode=0o700)
        os.chown(self.user_scratch, pw.pw_uid, pw.pw_gid)

    def key_fingerprint(self) -> str:
        out = subprocess.run(
            ["ssh-keygen", "-l", "-E", "sha256", "-f", f"{self.key}.pub"],
            check=True, capture_output=True, text=True,
        ).stdout.split()
        return out[1]  # "SHA256:..."

    # --- servers --------------------------------------------------------------------

    def _spawn(self, label: str, argv: list[str], port: int,
               env: dict[str, str] | None = None) -> Server:
        log = self.tmp / f"{label}.log"
        logf = open(log, "ab")
        proc = subprocess.Popen(
            argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **(env or {})},
            cwd=Path(__file__).resolve().parent.parent,
        )
        logf.close()
        # Into its own CPU cgroup before it can accept a connection, so every process
        # it forks is counted (see procs.CpuGroup).
        cgroup = CpuGroup(f"{self.tmp.name}-{label}-{proc.pid}")
        if not cgroup.add(proc.pid):
            cgroup.remove()
            cgroup = None
        server = Server(label=label, host="127.0.0.1", port=port, proc=proc, log=log, cgroup=cgroup)
        self.servers[label] = server
        try:
            wait_for_port("127.0.0.1", port, proc)
        except Exception as exc:
            raise RuntimeError(f"{label} did not start: {exc}\n{server.log_tail()}") from exc
        return server

    def start_sshd(self, max_startups: int, label: str = "sshd") -> Server:
        """OpenSSH's sshd in the foreground (-D) so its pid is the listener's. A second
        one under another label is the candidate of `--self-check` (an A/A run)."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        hostkey = self.tmp / f"{label}_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
        port = free_port()
        conf = self.tmp / f"{label}_config"
        conf.write_text("\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {hostkey}",
            f"PidFile {self.tmp / (label + '.pid')}",
            "UsePAM no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AuthorizedKeysFile .ssh/authorized_keys",
            f"Subsystem sftp {SFTP_SERVER}",
            f"AllowUsers {self.user}",
            # The same unauthenticated-connection allowance as meshsshd gets below.
            f"MaxStartups {max_startups}",
            "MaxSessions 10",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel ERROR",
            "",
        ]))
        return self._spawn(label, [SSHD, "-D", "-e", "-f", str(conf)], port)

    def start_meshsshd(self, max_startups: int, env: dict[str, str] | None = None,
                       whatif: bool = False) -> Server:
        """`meshsshd serve` from the venv; `env` is for experiments (--mesh-env), e.g.
        MALLOC_ARENA_MAX or PYTHONMALLOC, and is recorded with the results."""
        port = free_port()
        state = self.tmp / "meshsshd-state"
        state.mkdir(mode=0o700, exist_ok=True)
        conf = self.tmp / "meshsshd.toml"
        conf.write_text("\n".join([
            f'listen = ["127.0.0.1:{port}"]',
            f'state_dir = "{state}"',
            "sftp = true",
            "authorized_keys = true",
            f'sftp_server = "{SFTP_SERVER}"',
            "",
            "[limits]",
            f"max_startups = [{max_startups}, 30, {max_startups * 2}]",
            "max_sessions = 10",
            "",
            "[[access]]",
            'sources = ["127.0.0.0/8"]',
            'identities = ["*"]',
            f'local_users = ["{self.user}"]',
            "",
        ]))
        cmd = ([sys.executable, "-m", "bench.whatif"] if whatif else [venv_script("meshsshd")])
        return self._spawn("meshsshd", cmd + ["serve", "--config", str(conf)], port, env=env)

    # --- teardown -------------------------------------------------------------------

    def close(self, keep_logs_in: Path | None = None, stamp: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                server.stop()
            if keep_logs_in is not None:
                with contextlib.suppress(OSError):
                    keep_logs_in.mkdir(parents=True, exist_ok=True)
                    shutil.copy(server.log, keep_logs_in / f"{stamp}-{server.label}.log")
        if self.user:
            subprocess.run(["pkill", "-KILL", "-u", self.user], check=False)
            time.sleep(0.2)
            subprocess.run(["userdel", "-r", "-f", self.user], check=False, capture_output=True)
        scratch = getattr(self, "scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
