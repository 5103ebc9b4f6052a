"""Helpers the tests share: processes, ports, OS users, skips that fail on CI.

Nothing in the product imports this module.
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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ON_CI = os.environ.get("MESHSSHD_CI") == "1" or os.environ.get("CI") == "true"
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def require(condition: bool, reason: str) -> None:
    """Skip with a reason where a need is unmet; on CI nothing may skip, so fail."""
    if condition:
        return
    if ON_CI:
        pytest.fail(f"CI must not skip: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_tool(name: str) -> str:
    path = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    require(path is not None, f"needs {name} on PATH")
    assert path is not None
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def console_script(name: str) -> str:
    """The venv's console script, so tests run the installed entry points."""
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    require(found is not None, f"console script {name} is not installed (pip install -e .)")
    assert found is not None
    return found


class Proc:
    """A started daemon whose output goes to a log file that is shown when a test fails."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None, **kw) -> None:
        self.argv = list(argv)
        self.log = log
        self._logf = open(log, "ab")
        self.popen = subprocess.Popen(
            self.argv, stdout=self._logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True, **kw,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._logf.flush()
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._logf.close()
        return self.popen.returncode


@contextlib.contextmanager
def os_user(prefix: str = "mst") -> Iterator[pwd.struct_passwd]:
    """A throwaway login user with a home, removed afterwards even if the test fails.

    The password field is set to `*` (no password, but not locked) as OpenSSH needs for
    key logins without PAM; see README "Locked accounts".
    """
    require_root()
    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
    try:
        subprocess.run(["usermod", "-p", "*", name], check=True)
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", "-r", "-f", name], check=False, capture_output=True)


_ROOT_SHIM: list[Path] = []


def as_user(user: str, argv: Sequence[str]) -> list[str]:
    """`argv` run as `user`, with this venv's interpreter reachable by them.

    Where the venv's python lives under root's 0700 home (pyenv), the command runs in a
    private mount namespace in which /root is a 0711 stand-in holding only that tree, so
    nothing on the machine changes and the namespace ends with the command."""
    base = ["runuser", "-u", user, "--", *argv]
    real = Path(os.path.realpath(sys.executable))
    if real.parts[:2] != ("/", "root") or len(real.parts) < 3:
        return base
    top = real.parts[2]
    if not _ROOT_SHIM:
        import atexit
        import tempfile

        shim = Path(tempfile.mkdtemp(prefix="meshsshd-rootshim-"))
        shim.chmod(0o711)
        (shim / top).mkdir(mode=0o755)
        atexit.register(shutil.rmtree, shim, True)
        _ROOT_SHIM.append(shim)
    shim = _ROOT_SHIM[0]
    script = 'mount --bind "/root/$1" "$2/$1" && mount --rbind "$2" /root && shift 2 && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", top, str(shim), *base]


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """End a process started with start_new_session=True, and its children: `sig` to
    the group, then SIGKILL after `timeout`."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def process_alive(pid: int) -> bool:
    """pid exists and is not a zombie (a killed child of someone who has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


@contextlib.contextmanager
def netns(prefix: str = "mst") -> Iterator[str]:
    """A throwaway network namespace (lo up), removed afterwards with every process in it.

    wireguard-go keeps its socket in the shared /var/run/wireguard, so callers give each
    interface a unique name; deleting the namespace deletes its links, which ends
    wireguard-go, and any process still inside is killed first.
    """
    require_root()
    require_tool("ip")
    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _netns_pids(name)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while _netns_pids(name) and time.monotonic() < deadline:
                time.sleep(0.05)
        subprocess.run(["ip", "netns", "del", name], check=False)
