"""Helpers for the mesh tests: a real `meshmgmt serve`, real `meshsshd up` peers, the admin
API, and SSH tokens from the management's issuer (service user, client credentials).

Synchronous on purpose (urllib, subprocess): fixtures build the mesh before any event loop
exists, and the tests call them between awaits without holding connections open in them.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import Proc, console_script, free_port, wait_for_port

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
SSH_TOKEN = "urn:meshsshd:token-type:ssh"


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(name: str | None, fn: Callable[..., Any], *args: Any) -> Any:
    """Call fn in a thread that joined network namespace `name` (setns is per thread), so
    every socket it opens — urllib, an asyncio loop with asyncssh — lives in that namespace."""
    if name is None:
        return fn(*args)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{name}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def loopback_network() -> str:
    """A /24 in 127/8 no other test run is likely to use (127.77/16 is the README's)."""
    return f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.0/24"


class HTTPError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


def http(method: str, url: str, doc: Any = None, token: str | None = None, form: dict | None = None,
         timeout: float = 10.0) -> Any:
    headers = {}
    data = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if form is not None:
        data = urllib.parse.urlencode(form, doseq=True).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif doc is not None:
        data = json.dumps(doc).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        raise HTTPError(exc.code, parsed) from None
    return json.loads(body) if body else None


@dataclass
class Management:
    data_dir: Path
    network: str
    host: str = "127.0.0.1"
    port: int = 0
    proc: Proc | None = None
    netns: str | None = None
    admin_token: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def init(self) -> None:
        subprocess.run([console_script("meshmgmt"), "init", "--data-dir", str(self.data_dir),
                        "--admin-email", "admin@example.com"], check=True, capture_output=True)
        self.admin_token = (self.data_dir / "admin.token").read_text().strip()

    def start(self) -> None:
        if not self.port:
            self.port = free_port(self.host) if self.netns is None else random.randint(20000, 40000)
        argv = [console_script("meshmgmt"), "serve", "--data-dir", str(self.data_dir),
                "--listen", f"{self.host}:{self.port}", "--network", self.network]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.proc = Proc(argv, self.data_dir / "serve.log")
        deadline = time.monotonic() + 20
        while True:  # the port may be in another namespace: ask the API, not the socket
            try:
                self.request("GET", "/healthz", timeout=1)
                return
            except (OSError, HTTPError):
                if self.proc.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("meshmgmt did not start:\n" + self.proc.output()) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def request(self, method: str, path: str, doc: Any = None, token: str | None = None,
                form: dict | None = None, timeout: float = 10.0) -> Any:
        """HTTP to management, from inside its namespace when it runs in one."""
        return run_in_netns(self.netns, lambda: http(method, self.url + path, doc, token, form, timeout))

    def api(self, method: str, path: str, doc: Any = None) -> Any:
        return self.request(method, path, doc, token=self.admin_token)


@dataclass
class Peer:
    name: str
    state_dir: Path
    mgmt_url: str
    extra: Sequence[str] = ()
    netns: str | None = None
    proc: Proc | None = None
    starts: int = field(default=0)

    def start(self, setup_key: str | None = None, flags: Sequence[str] = ()) -> None:
        argv = [console_script("meshsshd"), "up", "--state-dir", str(self.state_dir), *flags]
        if setup_key:
            argv += ["--management-url", self.mgmt_url, "--setup-key", setup_key, "--hostname", self.name,
                     *self.extra]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.starts += 1
        self.proc = Proc(argv, self.state_dir.parent / f"{self.name}.{self.starts}.log")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        code = self.proc.stop(sig)
        return code

    def output(self) -> str:
        logs = sorted(self.state_dir.parent.glob(f"{self.name}.*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.status()
            if doc and predicate(doc):
                return doc
            if self.proc is not None and self.proc.popen.poll() is not None and not predicate(doc):
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: {what or 'condition'} not reached; status={self.status()}\n"
                             f"{self.output()[-4000:]}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [console_script("meshsshd"), *args, "--state-dir", str(self.state_dir)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)


class Identity:
    """A service user of management: client credentials → access token → SSH tokens."""

    def __init__(self, mgmt: Management, email: str) -> None:
        self.mgmt = mgmt
        self.email = email
        doc = mgmt.api("POST", "/api/users", {"email": email, "name": email.split("@")[0], "role": "user",
                                              "service": True})
        self.client_id, self.client_secret = doc["client_id"], doc["client_secret"]
        self._access = ""
        self._access_until = 0.0

    def access_token(self) -> str:
        if time.monotonic() > self._access_until:
            doc = self.mgmt.request("POST", "/oauth/token", form={
                "grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.client_secret})
            self._access = doc["access_token"]
            self._access_until = time.monotonic() + int(doc.get("expires_in", 60)) - 30
        return self._access

    def ssh_token(self, peer_id: str) -> str:
        doc = self.mgmt.request("POST", "/oauth/token", form={
            "grant_type": EXCHANGE, "subject_token": self.access_token(), "subject_token_type": ACCESS,
            "requested_token_type": SSH_TOKEN, "audience": peer_id})
        return doc["access_token"]


def host_keys_from_map(observer: Peer, target_peer_id: str) -> list[str]:
    """The target's SSH host keys as the observer's persisted map lists them (no TOFU)."""
    netmap = json.loads((observer.state_dir / "netmap.json").read_text())
    for p in netmap["peers"]:
        if p["id"] == target_peer_id:
            return list(p["ssh_host_keys"])
    raise AssertionError(f"{target_peer_id} is not in {observer.name}'s map")


def pid_gone(pid: int) -> bool:
    from meshsshd.state import pid_alive

    return not pid_alive(pid)


__all__ = ["Identity", "Management", "Peer", "HTTPError", "free_port", "host_keys_from_map", "http",
           "loopback_network", "run_in_netns", "wait_for_port"]
