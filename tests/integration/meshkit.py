"""A whole single-machine mesh for client tests: `meshmgmt serve`, peers started with
`meshsshd up --dataplane none`, and `meshssh login` completed by posting the device
verification form exactly as a browser would.

    mesh = Mesh(tmp).start()
    mesh.add_user("alice@example.com", "pw...", groups=["devs"])
    mesh.add_peer("db-1", key, "--allow-server-ssh", "--enable-ssh-sftp")
    cfg = mesh.login("alice@example.com", "pw...")      # a MESHSSH_CONFIG_DIR
    mesh.meshssh(cfg, "user@db-1", "id")

Everything runs as real processes on loopback addresses (127.77.0.0/16); `stop()`
ends every process it started.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import Proc, console_script, free_port, wait_for_port



def random_network() -> str:
    """A loopback /24 of its own, so that parallel meshes (other tests, a demo) never
    collide on mesh addresses."""
    return f"127.{secrets.randbelow(100) + 100}.{secrets.randbelow(250) + 1}.0/24"


class Mesh:
    def __init__(self, tmp: Path, network: str | None = None) -> None:
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.network = network or random_network()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = self.dir / "mgmt"
        self.token_file = self.data / "admin.token"
        self.mgmt: Proc | None = None
        self.peers: dict[str, Proc] = {}
        self.peer_dirs: dict[str, Path] = {}
        self.client_dirs: set[Path] = set()  # meshssh config dirs used: their masters stop with us

    # ---- management -----------------------------------------------------------------
    def start(self) -> Mesh:
        subprocess.run([console_script("meshmgmt"), "init", "--data-dir", str(self.data),
                        "--admin-email", "admin@example.com", "--admin-password-stdin"],
                       input=b"admin-password-123\n", check=True, capture_output=True)
        self.mgmt = Proc([console_script("meshmgmt"), "serve", "--data-dir", str(self.data),
                          "--listen", f"127.0.0.1:{self.port}", "--network", self.network],
                         self.dir / "meshmgmt.log")
        wait_for_port("127.0.0.1", self.port, proc=self.mgmt.popen)
        return self

    def api(self, method: str, path: str, doc: Any = None) -> Any:
        """The admin REST API (faster than a meshmgmt CLI process per call)."""
        req = urllib.request.Request(
            f"{self.url}{path}", method=method,
            data=None if doc is None else json.dumps(doc).encode(),
            headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}",
                     "Content-Type": "application/json"})
        for attempt in range(5):  # a loaded CI box: retry what a busy server may refuse
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    body = resp.read()
                return json.loads(body) if body else None
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500]
                if exc.code not in (429, 502, 503) or attempt == 4:
                    raise RuntimeError(f"{method} {path}: {exc.code} {detail!r}") from exc
            except (urllib.error.URLError, OSError) as exc:
                if attempt == 4:
                    raise RuntimeError(f"{method} {path}: {exc}") from exc
            time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def add_user(self, email: str, password: str) -> None:
        self.api("POST", "/api/users", {"email": email, "password": password, "role": "user"})

    def add_group(self, name: str, users: list[str] = ()) -> None:
        self.api("POST", "/api/groups", {"name": name, "peers": [], "users": list(users)})

    def add_ssh_policy(self, name: str, sources: list[str], destinations: list[str],
                       local_users: list[str] = ("*",)) -> dict:
        return self.api("POST", "/api/policies", {"name": name, "enabled": True, "rules": [{
            "sources": list(sources), "destinations": list(destinations), "protocol": "ssh",
            "ports": [], "bidirectional": False, "local_users": list(local_users),
            "allow_root": False}]})

    def setup_key(self, *groups: str) -> str:
        return self.api("POST", "/api/setup-keys", {"name": f"k{secrets.token_hex(3)}", "reusable": True,
                                                     "expires_in": 0, "usage_limit": 0,
                                                     "auto_groups": list(groups)})["key"]

    # ---- peers ----------------------------------------------------------------------
    def add_peer(self, name: str, setup_key: str, *flags: str, wait: str | None = "serving") -> dict:
        """Start `meshsshd up`; wait for `wait` ("serving", "" = registered, None = not at all)."""
        state = self.dir / f"peer-{name}"
        self.peer_dirs[name] = state
        self.peers[name] = Proc(
            [console_script("meshsshd"), "up", "--management-url", self.url, "--setup-key", setup_key,
             "--state-dir", str(state), "--hostname", name, "--dataplane", "none", *flags],
            self.dir / f"peer-{name}.log")
        if wait is None:
            return {}
        return self.wait_status(name, wait or None)

    def status(self, name: str) -> dict:
        try:
            return json.loads((self.peer_dirs[name] / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_status(self, name: str, state: str | None, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.peers[name].popen
            if proc.poll() is not None:
                raise RuntimeError(f"peer {name} exited: {self.peers[name].output()[-3000:]}")
            st = self.status(name)
            if st.get("mesh_ip") and (state is None or st.get("state") == state):
                if state != "serving" or st.get("ssh", {}).get("running"):
                    return st
            time.sleep(0.1)
        raise TimeoutError(f"peer {name} not {state}: {self.status(name)}\n{self.peers[name].output()[-3000:]}")

    def stop_peer(self, name: str) -> None:
        self.peers[name].stop()

    # ---- users logging in -----------------------------------------------------------
    def approve(self, user_code: str, email: str, password: str, action: str = "approve") -> str:
        """Post the verification form as a browser: GET (CSRF cookie + token), then POST."""
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        page = opener.open(f"{self.url}/device?user_code={urllib.parse.quote(user_code)}",
                           timeout=10).read().decode()
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
        form = {"user_code": user_code, "email": email, "password": password, "action": action}
        if csrf:
            form["csrf_token"] = csrf.group(1)
        resp = opener.open(f"{self.url}/device", urllib.parse.urlencode(form).encode(), timeout=10)
        return resp.read().decode()

    def login(self, email: str, password: str, config_dir: Path | None = None) -> Path:
        """`meshssh login --no-browser`, approved through the form; returns the config dir."""
        cfg = config_dir or self.dir / f"cfg-{email.split('@')[0]}"
        self.client_dirs.add(cfg)
        env = {**os.environ, "MESHSSH_CONFIG_DIR": str(cfg)}
        proc = subprocess.Popen([console_script("meshssh"), "login", "--management-url", self.url,
                                 "--no-browser"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            text = ""
            deadline = time.monotonic() + 20
            while "enter the code" not in text and time.monotonic() < deadline:
                line = proc.stderr.readline()
                if not line:
                    break
                text += line
            code = re.search(r"enter the code (\S+)", text)
            assert code, f"no user code in: {text!r}"
            assert "approved" in self.approve(code.group(1), email, password).lower()
            rest_out, rest_err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, text + rest_err
        assert f"as {email}" in rest_err
        return cfg

    def client_env(self, cfg: Path, source_peer: str | None = "laptop", **extra: str) -> dict[str, str]:
        self.client_dirs.add(Path(cfg))
        env = {**os.environ, "MESHSSH_CONFIG_DIR": str(cfg)}
        env.pop("SSH_AUTH_SOCK", None)
        if source_peer:
            env["MESHSSHD_STATUS_FILE"] = str(self.peer_dirs[source_peer] / "status.json")
        env.update(extra)
        return env

    def meshssh(self, cfg: Path, *args: str, input: bytes | None = None, timeout: float = 60,
                source_peer: str | None = "laptop", **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([console_script("meshssh"), *args], input=input, capture_output=True,
                              timeout=timeout, env=self.client_env(cfg, source_peer, **extra))

    def stop_masters(self) -> None:
        """`meshssh control stop` for every config dir a client ran with (client/mux_master.py)."""
        for cfg in sorted(self.client_dirs):
            subprocess.run([console_script("meshssh"), "control", "stop"], capture_output=True,
                           timeout=30, env={**os.environ, "MESHSSH_CONFIG_DIR": str(cfg)})

    def stop(self) -> None:
        self.stop_masters()
        for p in self.peers.values():
            p.stop()
        if self.mgmt is not None:
            self.mgmt.stop()

    def logs(self) -> str:
        parts = [f"---- {n} ----\n{p.output()[-4000:]}" for n, p in self.peers.items()]
        if self.mgmt is not None:
            parts.append(f"---- meshmgmt ----\n{self.mgmt.output()[-4000:]}")
        return "\n".join(parts)
