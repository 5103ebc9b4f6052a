"""Measurement 3b/3c: `meshssh` with a JWT, and native ssh through `meshssh proxy`,
against a managed peer.

The mesh is built from the real programs, on loopback (single-machine mode):
`meshmgmt init` + `meshmgmt serve` (SQLite), two `meshsshd up --dataplane none` peers
(`bench-client`, whose mesh IP is the connection's source, and `bench-server`), a
service user with client credentials in group `clients`, an SSH policy
clients → servers for the throwaway user, and `meshssh login --client-id`.

Both rows are divided by native `ssh host true` against sshd in the same run (default
algorithms), as the issue defines: meshssh ≤ 0.4, OpenSSH through the proxy ≤ 1.0.
Each sample is one whole client invocation (interpreter start, token, connect, exec,
close), which is what a user waits for. Both target rows run with the control master
(client/mux_master.py) as users get it: the warm-up call starts it, later calls reuse
its login while the SSH token lives. A third row, without target, is the cold path
(MESHSSH_CONTROL=no: everything in one process, a fresh login each time).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .servers import free_port, venv_script
from .stats import Figure, Summary, Target, summarize

MESHSSH_ROW = "latency meshssh true (JWT)"
PROXY_ROW = "latency ssh true via meshssh proxy"
COLD_ROW = "latency meshssh true (JWT, no control master)"


def _not_measured(sshd: Summary | None, reason: str) -> list[Figure]:
    return [
        Figure(MESHSSH_ROW, "s", "lower", sshd, None, Target("<=", 0.4), note=reason),
        Figure(PROXY_ROW, "s", "lower", sshd, None, Target("<=", 1.0), note=reason),
        Figure(COLD_ROW, "s", "lower", sshd, None, None, note=reason),
    ]


def wait_started(probe: Any, proc: subprocess.Popen, failure: str, timeout: float) -> None:
    """Poll `probe()` until it stops raising; give up when `proc` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except (OSError, RuntimeError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(failure) from None
            time.sleep(0.1)


def http_json(method: str, url: str, doc: Any = None, token: str | None = None,
              form: dict[str, str] | None = None, timeout: float = 15) -> Any:
    """One management API call with the standard library (the bench imports no aiohttp)."""
    headers = {}
    data = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif doc is not None:
        data = json.dumps(doc).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} {url}: {exc.code} {exc.read()[:300]!r}") from None
    return json.loads(body) if body else None


@dataclass
class Mesh:
    """The managed side of the bench; `close()` stops everything it started."""

    root: Path
    user: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    url: str = ""
    admin: str = ""
    server_ip: str = ""
    client_ip: str = ""
    env: dict[str, str] = field(default_factory=dict)
    client_id: str = ""
    client_secret: str = ""
    server_id: str = ""

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def api(self, method: str, path: str, doc: Any = None) -> Any:
        return http_json(method, self.url + path, doc, token=self.admin)

    def build(self, progress: Any) -> None:
        mgmt_dir = self.root / "mgmt"
        subprocess.run([venv_script("meshmgmt"), "init", "--data-dir", str(mgmt_dir),
                        "--admin-email", "admin@bench.example"], check=True, capture_output=True,
                       timeout=120)
        self.admin = (mgmt_dir / "admin.token").read_text().strip()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        network = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.0/24"
        mgmt = self._start("meshmgmt", [venv_script("meshmgmt"), "serve", "--data-dir", str(mgmt_dir),
                                        "--listen", f"127.0.0.1:{port}", "--network", network])
        self._wait(lambda: urllib.request.urlopen(self.url + "/healthz", timeout=2).close(), mgmt, "meshmgmt")
        key = self.api("POST", "/api/setup-keys", {"name": "bench", "reusable": True})["key"]
        states = {}
        for name in ("bench-client", "bench-server"):
            state = self.root / name
            state.mkdir(mode=0o700)
            states[name] = state
            self._start(name, [venv_script("meshsshd"), "up", "--state-dir", str(state),
                               "--management-url", self.url, "--setup-key", key, "--hostname", name,
                               "--dataplane", "none", "--allow-server-ssh"])
        for name, state in states.items():
            self._wait_status(state, lambda s: s.get("netmap_serial") is not None, f"{name}: first map")
        bot = self.api("POST", "/api/users", {"email": "bench@bench.example", "name": "bench",
                                              "role": "user", "service": True})
        self.api("POST", "/api/groups", {"name": "clients", "peers": ["bench-client"],
                                         "users": ["bench@bench.example"]})
        self.api("POST", "/api/groups", {"name": "servers", "peers": ["bench-server"]})
        self.api("POST", "/api/policies", {"name": "bench", "enabled": True, "rules": [
            {"sources": ["clients"], "destinations": ["servers"], "protocol": "ssh",
             "local_users": [self.user]}]})
        status = self._wait_status(states["bench-server"], lambda s: bool(s.get("ssh", {}).get("running")),
                                   "bench-server: SSH serving")
        self.server_ip = status["mesh_ip"]
        self.server_id = str(status.get("peer_id", ""))
        self.client_id, self.client_secret = bot["client_id"], bot["client_secret"]
        self.client_ip = self._status(states["bench-client"])["mesh_ip"]
        config_dir = self.root / "meshssh"
        config_dir.mkdir(mode=0o700)
        secret = self.root / "client-secret"
        secret.write_text(bot["client_secret"])
        os.chmod(secret, 0o600)
        self.env = {**os.environ, "MESHSSH_CONFIG_DIR": str(config_dir),
                    "MESHSSH_SOURCE_ADDRESS": self.client_ip, "MESHSSH_NO_BROWSER": "1"}
        done = subprocess.run([venv_script("meshssh"), "login", "--management-url", self.url,
                               "--client-id", bot["client_id"], "--client-secret-file", str(secret)],
                              env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"meshssh login failed: {done.stderr.strip()[-300:]}")
        progress(f"managed mesh: meshmgmt {self.url}, bench-server {self.server_ip}, "
                 f"bench-client {self.client_ip}")

    def _wait(self, probe: Any, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
        wait_started(probe, proc, f"{what} did not start ({self.root})", timeout)

    @staticmethod
    def _status(state: Path) -> dict[str, Any]:
        try:
            return json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def _wait_status(self, state: Path, pred: Any, what: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self._status(state)
            if doc and pred(doc):
                return doc
            time.sleep(0.05)
        raise RuntimeError(f"{what} not reached within {timeout:.0f} s")

    # --- the two clients --------------------------------------------------------------

    def meshssh_true(self) -> float:
        argv = [venv_script("meshssh"), f"{self.user}@bench-server", "true"]
        return self._timed(argv, "meshssh")

    def meshssh_true_cold(self) -> float:
        argv = [venv_script("meshssh"), f"{self.user}@bench-server", "true"]
        return self._timed(argv, "meshssh (no control master)", {"MESHSSH_CONTROL": "no"})

    def proxy_true(self) -> float:
        """OpenSSH with the ProxyCommand as the drop-in sets it (outer host key is the
        proxy's ephemeral one, so host-key checking is off for that hop; the proxy checks
        the peer's key against the map)."""
        argv = ["ssh", "-F", "/dev/null",
                "-o", f"ProxyCommand={venv_script('meshssh')} proxy %h %p --user %r",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "CheckHostIP=no", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-o", "PubkeyAuthentication=no", "-o", "PasswordAuthentication=no",
                # single-machine mode has no DNAT of port 22 to 22022 (that is the data plane's)
                "-p", "22022", f"{self.user}@bench-server", "true"]
        return self._timed(argv, "ssh via meshssh proxy")

    def _timed(self, argv: list[str], what: str, extra_env: dict[str, str] | None = None) -> float:
        env = {**self.env, **(extra_env or {})}
        t0 = time.perf_counter()
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=60)
        dt = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{what} exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace').strip()[-300:]}")
        return dt

    def close(self, keep_logs_in: Path | None = None, stamp: str = "") -> None:
        if self.env:  # the control master the meshssh calls started
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([venv_script("meshssh"), "control", "stop"], env=self.env,
                               capture_output=True, timeout=30)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(5)
        if keep_logs_in is not None:
            keep_logs_in.mkdir(parents=True, exist_ok=True)
            for log in self.logs:
                with contextlib.suppress(OSError):
                    shutil.copy(log, keep_logs_in / f"{stamp}-{log.name}")


def available() -> str | None:
    """Why the managed rows cannot run, or None."""
    for script in ("meshmgmt", "meshssh", "meshsshd"):
        try:
            venv_script(script)
        except FileNotFoundError:
            return f"{script} is not installed"
    try:
        import meshssh_client.proxy  # noqa: F401
        import meshmgmt.app  # noqa: F401
        import meshsshd.agent  # noqa: F401
    except ImportError as exc:
        return f"not available yet ({exc})"
    return None


def _target(bound: float | None) -> Target | None:
    return None if bound is None else Target("<=", bound)


def measure_managed_latency(ctx: Any, sshd: Summary | None,
                            baseline: dict[str, list[float]]) -> list[Figure]:
    reason = available()
    if reason:
        return _not_measured(sshd, reason)
    mesh = Mesh(root=ctx.ws.tmp / "mesh", user=ctx.ws.user)
    mesh.root.mkdir(mode=0o711)
    try:
        try:
            mesh.build(ctx.progress)
        except Exception as exc:
            ctx.notes.append(f"managed mesh could not be built: {exc}")
            return _not_measured(sshd, f"managed mesh could not be built: {str(exc)[:200]}")
        out: list[Figure] = []
        for name, one, target in ((MESHSSH_ROW, mesh.meshssh_true, 0.4),
                                  (PROXY_ROW, mesh.proxy_true, 1.0),
                                  (COLD_ROW, mesh.meshssh_true_cold, None)):
            try:
                values: list[float] = []
                raw: list[float] = []
                for r in range(ctx.rounds):
                    one()  # warm-up (page cache, token endpoint)
                    runs = [one() for _ in range(ctx.latency_runs)]
                    values.append(summarize(runs).median)
                    raw += runs
                    ctx.progress(f"  {name}: round {r + 1}/{ctx.rounds} {values[-1] * 1000:.1f} ms")
                out.append(Figure(name, "s", "lower", sshd, summarize(values), _target(target),
                                  note="whole client invocation; baseline: native ssh to sshd",
                                  extra={"runs": raw}))
            except Exception as exc:
                out.append(Figure(name, "s", "lower", sshd, None, _target(target),
                                  note=f"failed: {str(exc)[:200]}"))
                ctx.notes.append(f"{name}: {exc}")
        return out
    finally:
        from .report import OUT_DIR, stamp_now

        mesh.close(keep_logs_in=OUT_DIR, stamp=stamp_now())
