"""`meshssh exec` over N peers against parallel-ssh over OpenSSH's sshd, on one machine.

    sudo /work/venv/bin/python -m bench.fanout_bench --peers 50 [--throttle 32] [--rounds 3]

What is real and what is folded together (say this with the numbers):
- management is the real `meshmgmt serve`; the N peers and the laptop are *registered*
  through the real registration API (each with its own peer id, WireGuard key and mesh
  address 127.x.y.z), so the client resolves N peers, asks one token exchange for N
  audiences, dials N distinct addresses, checks N host keys against the list and logs in
  N times with N different tokens — exactly what it does on a real mesh.
- the server side is folded: ONE standalone `meshsshd serve` listens on all N addresses
  and accepts every peer id as audience (instead of N `meshsshd up` processes, which at
  ~60 MB each would not fit 500 on this box). The OpenSSH side is the same shape: sshd
  instances listening on the same N addresses (16 per sshd, OpenSSH's listener limit),
  so both clients face one server process per group of addresses.
- clients: `meshssh exec --throttle T` vs parallel-ssh's `ParallelSSHClient(pool_size=T)`
  (libssh2, public-key auth; it does not check host keys) and, as a baseline, OpenSSH
  `ssh` processes under `xargs -P T`. Each client is one process tree timed from start
  to exit (interpreter start-up included); peak RSS is from wait4 (ru_maxrss), peak fds
  from sampling /proc/PID/fd every 5 ms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .managed import http_json, wait_started
from .servers import SSHD, Workspace, free_port, venv_script

PSSH_SCRIPT = r"""
import sys
from pssh.clients import ParallelSSHClient
hosts_file, user, key, port, pool, cmd = sys.argv[1:7]
hosts = open(hosts_file).read().split()
client = ParallelSSHClient(hosts, user=user, pkey=key, port=int(port), pool_size=int(pool),
                           num_retries=1, timeout=30)
output = client.run_command(cmd, stop_on_errors=False)
client.join(output)
ok = 0
for host_out in output:
    lines = list(host_out.stdout or [])
    if host_out.exception is None and host_out.exit_code == 0 and lines:
        ok += 1
print(ok)
"""


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Run:
    tool: str
    seconds: float
    ok: int
    peak_rss_mb: float | None
    peak_fds: int | None
    rc: int


def measure(argv: list[str], env: dict[str, str], out: Path, count_ok: Any) -> tuple[float, int, float, int, int]:
    """Run argv to completion; (seconds, ok count, peak RSS MB, peak fds, exit code)."""
    with open(out, "wb") as f, open(out.with_suffix(".err"), "wb") as ferr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=f, stderr=ferr, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=_raise_nofile)
        peak_fds = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_fds
            fd_dir = f"/proc/{proc.pid}/fd"
            while not stop.is_set():
                try:
                    peak_fds = max(peak_fds, len(os.listdir(fd_dir)))
                except OSError:
                    pass
                time.sleep(0.005)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        stop.set()
        t.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return seconds, count_ok(out.read_bytes()), usage.ru_maxrss / 1024, peak_fds, proc.returncode


class Fleet:
    """management + N registered peers + one meshsshd serve + ceil(N/16) sshd."""

    def __init__(self, ws: Workspace, n: int, throttle: int, log: Any) -> None:
        self.ws, self.n, self.throttle, self.log = ws, n, throttle, log
        self.root = ws.tmp / "fanout"
        self.root.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.peers: list[dict[str, Any]] = []

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        f = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_raise_nofile)
        f.close()
        self.procs.append(proc)
        return proc

    def api(self, method: str, path: str, doc: Any = None) -> Any:
        return http_json(method, self.url + path, doc, self.admin, timeout=60)

    def _wait(self, probe: Any, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
        wait_started(probe, proc, f"{what} did not start (logs in {self.root})", timeout)

    def build(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from meshsshd.hostkeys import load_or_create
        from meshsshd.peerproof import prove, public_key_b64

        mgmt_dir = self.root / "mgmt"
        subprocess.run([venv_script("meshmgmt"), "init", "--data-dir", str(mgmt_dir),
                        "--admin-email", "admin@bench.example"], check=True, capture_output=True)
        self.admin = (mgmt_dir / "admin.token").read_text().strip()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        network = f"127.{random.randint(100, 250)}.0.0/16"
        mgmt = self._start("meshmgmt", [venv_script("meshmgmt"), "serve", "--data-dir", str(mgmt_dir),
                                        "--listen", f"127.0.0.1:{port}", "--network", network,
                                        "--register-rate", "100000", "--register-burst", "100000"])
        self._wait(lambda: urllib.request.urlopen(self.url + "/healthz", timeout=2).close(), mgmt, "meshmgmt")
        groups = {g: self.api("POST", "/api/groups", {"name": g})["id"] for g in ("fleet", "laptops", "ops")}
        fleet_key = self.api("POST", "/api/setup-keys", {"name": "fleet", "reusable": True,
                                                         "auto_groups": [groups["fleet"]]})["key"]
        laptop_key = self.api("POST", "/api/setup-keys", {"name": "laptop", "reusable": True,
                                                          "auto_groups": [groups["laptops"]]})["key"]
        state = self.root / "meshsshd-state"
        hostkey = load_or_create(state).public_lines[0]

        def register(name: str, key: str, server: bool) -> dict[str, Any]:
            wg = X25519PrivateKey.generate()
            body = {"setup_key": key, "hostname": name, "ssh_host_key": hostkey,
                    "wg_public_key": public_key_b64(wg),
                    "flags": {"allow_server_ssh": server}, "version": "bench", "endpoints": []}
            challenge = http_json("POST", f"{self.url}/api/peers/challenge",
                                  {"wg_public_key": body["wg_public_key"]}, timeout=60)
            return http_json("POST", f"{self.url}/api/peers/register", prove(body, wg, challenge), timeout=60)

        t0 = time.perf_counter()
        self.laptop = register("laptop", laptop_key, False)
        with ThreadPoolExecutor(8) as pool:
            self.peers = list(pool.map(lambda i: register(f"p{i:04d}", fleet_key, True), range(self.n)))
        self.log(f"registered {self.n} peers in {time.perf_counter() - t0:.1f} s")
        svc = self.api("POST", "/api/users", {"email": "bench@bench.example", "service": True})
        self.api("PUT", f"/api/groups/{groups['ops']}", {"users": ["bench@bench.example"]})
        self.api("POST", "/api/policies", {"name": "fleet-ssh", "enabled": True, "rules": [{
            "sources": ["ops", "laptops"], "destinations": ["fleet"], "protocol": "ssh",
            "local_users": [self.ws.user]}]})
        # One meshsshd for all N addresses, every peer id an accepted audience.
        self.mesh_port = free_port()
        conf = self.root / "meshsshd.toml"
        conf.write_text("\n".join([
            "listen = [" + ", ".join(f'"{p["mesh_ip"]}:{self.mesh_port}"' for p in self.peers) + "]",
            f'state_dir = "{state}"',
            "[jwt]",
            f'issuer = "{self.url}"',
            "audience = [" + ", ".join(f'"{p["peer_id"]}"' for p in self.peers) + "]",
            f'jwks_url = "{self.url}/oauth/jwks"',
            'user_claim = "email"',
            "[limits]",
            f"max_startups = [{self.throttle * 4}, 30, {self.throttle * 8}]",
            "[[access]]",
            f'sources = ["{self.laptop["mesh_ip"]}/32"]',
            'identities = ["bench@bench.example"]',
            f'local_users = ["{self.ws.user}"]',
            ""]))
        server = self._start("meshsshd", [venv_script("meshsshd"), "serve", "--config", str(conf),
                                          "--log-level", "warning"])
        last = self.peers[-1]["mesh_ip"]
        self._wait(lambda: __import__("socket").create_connection((last, self.mesh_port), 1).close(),
                   server, "meshsshd serve")
        # sshd: the same addresses, 16 listeners per instance.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.sshd_port = free_port()
        sshd_key = self.root / "sshd_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshd_key)], check=True)
        for i in range(math.ceil(self.n / 16)):
            chunk = self.peers[i * 16:(i + 1) * 16]
            cfg = self.root / f"sshd_{i}.conf"
            cfg.write_text("\n".join([
                *(f"ListenAddress {p['mesh_ip']}:{self.sshd_port}" for p in chunk),
                f"HostKey {sshd_key}", f"PidFile {self.root / f'sshd_{i}.pid'}", "UsePAM no",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                f"AllowUsers {self.ws.user}", f"MaxStartups {self.throttle * 4}:30:{self.throttle * 8}",
                "UseDNS no", "PrintMotd no", "PrintLastLog no", "LogLevel ERROR", ""]))
            proc = self._start(f"sshd_{i}", [SSHD, "-D", "-e", "-f", str(cfg)])
            ip = chunk[-1]["mesh_ip"]
            self._wait(lambda ip=ip: __import__("socket").create_connection((ip, self.sshd_port), 1).close(),
                       proc, f"sshd {i}")
        # Log the client in as the service user.
        self.cfg_dir = self.root / "meshssh"
        self.cfg_dir.mkdir(mode=0o700)
        secret = self.root / "secret"
        secret.write_text(svc["client_secret"])
        secret.chmod(0o600)
        self.env = {**os.environ, "MESHSSH_CONFIG_DIR": str(self.cfg_dir),
                    "MESHSSH_SOURCE_ADDRESS": self.laptop["mesh_ip"], "MESHSSH_NO_BROWSER": "1"}
        done = subprocess.run([venv_script("meshssh"), "login", "--management-url", self.url, "--client-id",
                               svc["client_id"], "--client-secret-file", str(secret)],
                              env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"meshssh login failed: {done.stderr}")
        self.hosts_file = self.root / "hosts"
        self.hosts_file.write_text("\n".join(p["mesh_ip"] for p in self.peers) + "\n")

    # --- the clients ----------------------------------------------------------------------

    def run_meshssh(self, command: str) -> Run:
        argv = [venv_script("meshssh"), "exec", "-q", "-v", "-l", self.ws.user, "-p", str(self.mesh_port),
                "--throttle", str(self.throttle), "--hosts", "group:fleet", "--", command]
        s, ok, rss, fds, rc = measure(argv, self.env, self.root / "out-meshssh",
                                      lambda b: sum(1 for ln in b.splitlines() if ln.endswith(b": hi")))
        return Run("meshssh exec", s, ok, rss, fds, rc)

    def run_pssh(self, command: str) -> Run:
        argv = [sys.executable, "-c", PSSH_SCRIPT, str(self.hosts_file), self.ws.user, str(self.ws.key),
                str(self.sshd_port), str(self.throttle), command]
        s, ok, rss, fds, rc = measure(argv, dict(os.environ), self.root / "out-pssh",
                                      lambda b: int(b.split()[-1]) if b.split() else 0)
        return Run("parallel-ssh (libssh2) → sshd", s, ok, rss, fds, rc)

    def run_xargs_ssh(self, command: str) -> Run:
        ssh = (f"ssh -q -i {self.ws.key} -p {self.sshd_port} -o BatchMode=yes -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null {self.ws.user}@{{}} {command!r}")
        argv = ["sh", "-c", f"xargs -P {self.throttle} -I{{}} {ssh} < {self.hosts_file}"]
        s, ok, _, _, rc = measure(argv, dict(os.environ), self.root / "out-xargs",
                                  lambda b: sum(1 for ln in b.splitlines() if ln == b"hi"))
        return Run(f"OpenSSH ssh × N (xargs -P {self.throttle})", s, ok, None, None, rc)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 15)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=50)
    ap.add_argument("--throttle", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", choices=("meshssh", "pssh", "xargs"), action="append",
                    help="run only these clients (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    tools = args.only or ["meshssh", "pssh", "xargs"]

    def log(msg: str) -> None:
        print(f"[fanout-bench] {msg}", file=sys.stderr, flush=True)

    ws = Workspace.create()
    fleet = Fleet(ws, args.peers, args.throttle, log)
    results: list[Run] = []
    try:
        t0 = time.perf_counter()
        fleet.build()
        log(f"set up {args.peers} peers in {time.perf_counter() - t0:.1f} s ({ws.tmp})")
        for r in range(args.rounds):
            k = r % len(tools)  # who goes first rotates from round to round
            for tool in tools[k:] + tools[:k]:
                run = {"meshssh": fleet.run_meshssh, "pssh": fleet.run_pssh,
                       "xargs": fleet.run_xargs_ssh}[tool]("echo hi")
                results.append(run)
                log(f"round {r + 1}: {run.tool}: {run.seconds:.2f} s, {run.ok}/{args.peers} ok, rc {run.rc}")
                if run.ok < args.peers:
                    err = (fleet.root / f"out-{tool}.err").read_text(errors="replace")
                    log("stderr tail:\n" + err[-1500:])
    finally:
        fleet.close()
        ws.close()
    print(f"\nfan-out of `echo hi` to {args.peers} peers, throttle {args.throttle}, {os.cpu_count()} CPUs")
    print(f"{'client':<42} {'wall s':>7} {'ok':>9} {'peak RSS MB':>12} {'peak fds':>9}")
    for run in results:
        rss = f"{run.peak_rss_mb:.0f}" if run.peak_rss_mb is not None else "-"
        fds = str(run.peak_fds) if run.peak_fds is not None else "-"
        print(f"{run.tool:<42} {run.seconds:>7.2f} {f'{run.ok}/{args.peers}':>9} {rss:>12} {fds:>9}")
    if args.json:
        args.json.write_text(json.dumps({"peers": args.peers, "throttle": args.throttle,
                                         "results": [r.__dict__ for r in results]}, indent=1))
    return 0 if all(r.ok == args.peers for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
