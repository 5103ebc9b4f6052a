"""Start `meshsshd serve` for integration tests, and drive it with OpenSSH.

Usable from any test module:

    from tests.integration.serverkit import ServerKit, client_key, install_key

    with ServerKit(tmp_path, {"authorized_keys": True, "access": [...]}) as srv:
        r = srv.ssh(user, key, "id -u")

`ServerKit` writes a TOML config (keys as in deploy/meshsshd.example.toml), starts the
daemon on a free loopback port, waits until it listens, and on exit stops it and shows
its log if the daemon died. Host keys are generated once per test run and copied into each
server's state directory, so starting a server costs well under a second.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import Proc, console_script, free_port, require_tool, wait_for_port

SSH_BASE_OPTS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "GlobalKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=10",
    "-F", "/dev/null",
)

_HOSTKEY_CACHE: Path | None = None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        s = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """Enough TOML for server configs: scalars, lists, tables, arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, Sequence[Mapping[str, Any]]]] = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f'"{k}" = {_toml_value(v)}' for k, v in table.items())
    for name, items in arrays:
        for item in items:
            lines.append(f"\n[[{name}]]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


def _cached_host_keys() -> Path:
    """Generate host keys once per process (RSA-3072 generation is the slow part)."""
    global _HOSTKEY_CACHE
    if _HOSTKEY_CACHE is None:
        import asyncssh

        d = Path(tempfile.mkdtemp(prefix="meshsshd-hostkeys-"))
        for name, alg, kw in (("ed25519", "ssh-ed25519", {}), ("rsa", "ssh-rsa", {"key_size": 3072})):
            path = d / f"ssh_host_{name}_key"
            asyncssh.generate_private_key(alg, **kw).write_private_key(str(path))
            os.chmod(path, 0o600)
        _HOSTKEY_CACHE = d
    return _HOSTKEY_CACHE


@dataclass
class ClientKey:
    path: Path
    public: str
    fingerprint: str   # "SHA256:..."

    @property
    def identity(self) -> str:
        """The access-rule identity of a login with this key."""
        return f"key:{self.fingerprint}"


def client_key(directory: Path, name: str = "id_ed25519") -> ClientKey:
    require_tool("ssh-keygen")
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return ClientKey(path, (directory / f"{name}.pub").read_text().strip(), out.split()[1])


def install_key(user: Any, *keys: ClientKey, options: str = "") -> Path:
    """Write ~user/.ssh/authorized_keys as OpenSSH StrictModes wants it (owner, 0600)."""
    ssh_dir = Path(user.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    ak = ssh_dir / "authorized_keys"
    ak.write_text("".join(f"{options + ' ' if options else ''}{k.public}\n" for k in keys))
    for p in (ssh_dir, ak):
        os.chown(p, user.pw_uid, user.pw_gid)
    ak.chmod(0o600)
    return ak


def key_login_config(tmp: Path, user: Any, **config: Any) -> tuple[ClientKey, dict[str, Any]]:
    """A client key installed for `user` and a server config whose one rule lets exactly
    that key log in as that user from loopback (plus `config`)."""
    key = client_key(tmp)
    install_key(user, key)
    rule = {"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [user.pw_name]}
    return key, {"authorized_keys": True, "access": [rule], **config}


class ServerKit:
    """A `meshsshd serve` subprocess with its own config and state directory."""

    def __init__(self, tmp: Path, config: Mapping[str, Any] | None = None, *, host: str = "127.0.0.1",
                 log_level: str = "info", copy_host_keys: bool = True, env: Mapping[str, str] | None = None,
                 netns: str | None = None, daemon_prefix: Sequence[str] = ()) -> None:
        """netns: run the daemon, and the ssh commands built here, in that network namespace.
        daemon_prefix: a command the daemon is started through (e.g. `unshare ...`)."""
        self.dir = Path(tmp)
        self.netns = netns
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.daemon_prefix = list(daemon_prefix)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = free_port(host)
        self.state_dir = self.dir / "state"
        self.config_path = self.dir / "meshsshd.toml"
        self.log_level = log_level
        self.config: dict[str, Any] = {"listen": [f"{host}:{self.port}"], "state_dir": str(self.state_dir)}
        self.config.update(config or {})
        self.copy_host_keys = copy_host_keys
        self.env = dict(env or {})
        self.proc: Proc | None = None

    # ---- lifecycle ------------------------------------------------------------------
    def write_config(self, **changes: Any) -> None:
        self.config.update(changes)
        self.config_path.write_text(to_toml(self.config))

    def start(self) -> ServerKit:
        self.write_config()
        if self.copy_host_keys and not self.state_dir.exists():
            self.state_dir.mkdir(mode=0o700, parents=True)
            for f in _cached_host_keys().iterdir():
                shutil.copy2(f, self.state_dir / f.name)
        self.proc = Proc([*self.prefix, *self.daemon_prefix, console_script("meshsshd"), "serve", "--config", str(self.config_path),
                          "--log-level", self.log_level], self.dir / "meshsshd.log", env=self.env)
        try:
            if self.netns:
                self._wait_in_netns()
            else:
                wait_for_port(self.host, self.port, proc=self.proc.popen)
        except Exception:
            print(self.output())
            self.stop()
            raise
        return self

    def _wait_in_netns(self, timeout: float = 15.0) -> None:
        probe = f"import socket; socket.create_connection(({self.host!r}, {self.port}), 0.5).close()"
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while subprocess.run([*self.prefix, sys.executable, "-c", probe], capture_output=True).returncode != 0:
            if self.proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"meshsshd did not listen on {self.host}:{self.port} in {self.netns}")
            time.sleep(0.1)

    def reload(self, **changes: Any) -> None:
        """Rewrite the config and SIGHUP the daemon (MeshSSHServer.apply)."""
        import signal

        self.write_config(**changes)
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)

    def output(self) -> str:
        log = self.dir / "meshsshd.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> ServerKit:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        died = self.proc is not None and self.proc.popen.poll() is not None
        self.stop()
        if died or exc[0] is not None:
            print("---- meshsshd log ----\n" + self.output()[-20000:])

    # ---- OpenSSH --------------------------------------------------------------------
    def ssh_argv(self, user: str, key: ClientKey | None = None, *args: str, opts: Sequence[str] = ()) -> list[str]:
        # OpenSSH keeps the first value of an option: the caller's opts go first.
        argv = [*self.prefix, require_tool("ssh"), *opts, *SSH_BASE_OPTS, "-p", str(self.port)]
        if key is not None:
            argv += ["-i", str(key.path), "-o", "IdentitiesOnly=yes"]
        return [*argv, f"{user}@{self.host}", *args]

    def ssh(self, user: str, key: ClientKey | None, *command: str, opts: Sequence[str] = (),
            input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv(user, key, *command, opts=opts), input=input,
                              capture_output=True, timeout=timeout)

    def tool_opts(self, key: ClientKey | None, port_flag: str = "-P") -> list[str]:
        """Options for scp/sftp (which spell the port -P)."""
        argv = [*SSH_BASE_OPTS, port_flag, str(self.port)]
        if key is not None:
            argv += ["-i", str(key.path), "-o", "IdentitiesOnly=yes"]
        return argv

    # ---- other clients --------------------------------------------------------------
    def curl_sftp(self, user: str, key: ClientKey, path: str, *opts: str) -> subprocess.CompletedProcess:
        """curl (libssh2) on sftp://user@server/path; -k: as with SSH_BASE_OPTS, the tests
        are not about the host key."""
        return subprocess.run([require_tool("curl"), "-sS", "-k", *opts, "--key", str(key.path),
                               "--pubkey", f"{key.path}.pub", f"sftp://{user}@{self.host}:{self.port}/{path}"],
                              capture_output=True, timeout=60)


def read_until(fd: int, pattern: bytes, timeout: float = 15.0, buf: bytes = b"") -> tuple[re.Match[bytes], bytes]:
    """Read a pty master `fd` until the regex `pattern` matches what was read (plus `buf`,
    read before); return the match and everything read. Shared by the tests that drive an
    interactive ssh/meshssh through a pty; a timeout or the other end closing fails the test
    with the tail of the output."""
    m = re.search(pattern, buf)
    if m:
        return m, buf
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            m = re.search(pattern, buf)
            if m:
                return m, buf
    raise AssertionError(f"{pattern!r} not seen; got {buf[-2000:]!r}")


class Talker:
    """A loopback server that sends `payload` and FIN as soon as it accepts."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.srv = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(self.payload)
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(10)
                    conn.recv(1)   # hold the socket until the far side is done
                except OSError:
                    pass

    def close(self) -> None:
        self.srv.close()
