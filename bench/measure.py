"""The measurements of issue 6, each run against both servers, alternating, for N rounds.

Each `measure_*` function returns `Figure`s (bench/stats.py). Round r runs sshd first
when r is even and meshsshd first when r is odd, so a slow drift of the shared machine's
load hits both sides alike; the per-round pairs also give paired ratios (JSON `extra`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procs, transfer
from .servers import Server, Workspace
from .stats import Figure, Target, paired_ratios, summarize

GIB = 2**30
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Ctx:
    ws: Workspace
    sshd: Server
    mesh: Server
    rounds: int
    size: int
    latency_runs: int = 10
    sessions: tuple[int, ...] = (100, 500, 1000)
    login_seconds: float = 10.0
    login_concurrency: int = 50
    login_procs: int = 2
    kex: str = "curve25519-sha256"
    memory_rounds: int = 3
    progress: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)
    # Starts a fresh daemon for a label ("sshd"/"meshsshd"); set by the CLI.
    restart: Callable[[str], Server] | None = None

    def order(self, r: int) -> tuple[Server, Server]:
        return (self.sshd, self.mesh) if r % 2 == 0 else (self.mesh, self.sshd)

    def check_alive(self, during: str = "") -> None:
        """A daemon that died must not take every later sample with it: note it (its log
        is kept in bench/out/) and start a fresh one, or raise without a restarter."""
        for s in (self.sshd, self.mesh):
            if s.alive():
                continue
            self.progress(f"{s.label} log tail:\n{s.log_tail()}")
            msg = f"{s.label} died (exit {s.proc.returncode}) during {during or 'the run'}"
            if self.restart is None:
                raise RuntimeError(msg)
            self.notes.append(msg + "; restarted")
            self.progress(self.notes[-1])
            fresh = self.restart(s.label)
            if s.label == "sshd":
                self.sshd = fresh
            else:
                self.mesh = fresh

    def baseline_procs(self, server: Server) -> int:
        return len(procs.process_tree(server.pid))


def settle(server: Server, timeout: float = 5.0, baseline: int = 1) -> None:
    """Wait until the per-connection processes are gone (and reaped into cumulative
    CPU times), so the next reading starts from a quiet tree."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(procs.process_tree(server.pid)) > baseline:
        time.sleep(0.02)


def _run_rounds(ctx: Ctx, what: str, sample: Callable[[Server], float],
                cpu: bool = False) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """samples[label] and server CPU seconds per sample[label]."""
    values: dict[str, list[float]] = {"sshd": [], "meshsshd": []}
    cpus: dict[str, list[float]] = {"sshd": [], "meshsshd": []}
    for r in range(ctx.rounds):
        for server in ctx.order(r):
            base = ctx.baseline_procs(server)
            settle(server, baseline=base)
            c0 = server.cpu_seconds() if cpu else 0.0
            try:
                v = sample(server)
            except Exception as exc:
                if server.alive():
                    raise
                ctx.progress(f"  {what}: round {r + 1} {server.label} lost: {exc}")
                ctx.check_alive(what)
                continue
            if cpu:
                settle(server, baseline=base)
                cpus[server.label].append(server.cpu_seconds() - c0)
            values[server.label].append(v)
            ctx.progress(f"  {what}: round {r + 1}/{ctx.rounds} {server.label} {v:.4g}")
        ctx.check_alive(what)
    for label, vs in values.items():
        if not vs:
            raise RuntimeError(f"{what}: no sample from {label}")
    return values, cpus


def _pair_extra(values: dict[str, list[float]]) -> dict[str, Any]:
    pr = paired_ratios(values["meshsshd"], values["sshd"])
    return {"paired_ratios": pr, "paired_ratio_median": summarize(pr).median if pr else None}


def _throughput_figures(ctx: Ctx, name: str, run: Callable[[Server], float], size: int,
                        target: Target) -> list[Figure]:
    values, cpus = _run_rounds(ctx, name, run, cpu=True)
    mbps = {k: [size / 1e6 / s for s in v] for k, v in values.items()}
    cpu_per_gib = {k: [c * GIB / size for c in v] for k, v in cpus.items()}
    return [
        Figure(name, "MB/s", "higher", summarize(mbps["sshd"]), summarize(mbps["meshsshd"]),
               target, extra={**_pair_extra(mbps), "seconds": values, "bytes": size}),
        Figure(f"{name}: server CPU", "s/GiB", "lower", summarize(cpu_per_gib["sshd"]),
               summarize(cpu_per_gib["meshsshd"]), None,
               note="daemon process tree incl. the user's cat/head/sftp-server"),
    ]


def measure_bulk(ctx: Ctx) -> list[Figure]:
    figures: list[Figure] = []
    for cipher in transfer.CIPHERS:
        short = cipher.split("@")[0]
        ctx.progress(f"bulk {short}")
        figures += _throughput_figures(
            ctx, f"bulk upload {short}",
            lambda s, c=cipher: transfer.upload(ctx.ws, s, c, ctx.size), ctx.size, Target(">=", 1.0))
        figures += _throughput_figures(
            ctx, f"bulk download {short}",
            lambda s, c=cipher: transfer.download(ctx.ws, s, c, ctx.size), ctx.size, Target(">=", 1.0))
    return figures


def measure_sftp(ctx: Ctx) -> list[Figure]:
    cipher = transfer.CIPHERS[0]
    src = transfer.sparse_file(ctx.ws.scratch / "sftp-src", ctx.size)
    ctx.progress("sftp (aes128-gcm)")
    try:
        figures = _throughput_figures(
            ctx, "sftp put", lambda s: transfer.sftp_put(ctx.ws, s, src, cipher), ctx.size,
            Target(">=", 1.0))
        figures += _throughput_figures(
            ctx, "sftp get", lambda s: transfer.sftp_get(ctx.ws, s, src, cipher), ctx.size,
            Target(">=", 1.0))
    finally:
        src.unlink(missing_ok=True)
    return figures


def ssh_true(ws: Workspace, server: Server, *extra: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(transfer.ssh_base(ws, server, *extra) + ["true"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    dt = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"ssh true to {server.label}: {done.stderr.decode(errors='replace')}")
    return dt


def latency_samples(ctx: Ctx, label: str, one: Callable[[], float]) -> tuple[float, list[float]]:
    """Median of `latency_runs` runs (one warm-up run discarded) and the raw runs."""
    one()
    runs = [one() for _ in range(ctx.latency_runs)]
    return summarize(runs).median, runs


def parse_negotiated(ssh_v_stderr: str) -> dict[str, str]:
    """Key exchange, host key algorithm, cipher and server version from `ssh -v` output."""
    out: dict[str, str] = {}
    for line in ssh_v_stderr.splitlines():
        if "kex: algorithm:" in line:
            out["kex"] = line.split(":")[-1].strip()
        elif "kex: host key algorithm:" in line:
            out["host_key"] = line.split(":")[-1].strip()
        elif "kex: server->client cipher:" in line:
            out["cipher"] = line.split("cipher:")[1].split()[0]
        elif "remote software version" in line:
            out["server_version"] = line.split("remote software version")[-1].strip()
    return out


def negotiated(ws: Workspace, server: Server) -> dict[str, str]:
    """What the native client and this server agree on by default."""
    done = subprocess.run(transfer.ssh_base(ws, server, "-v") + ["true"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    return parse_negotiated(done.stderr)


def measure_latency_native(ctx: Ctx) -> tuple[list[Figure], dict[str, list[float]]]:
    """Native `ssh host true` with a key against both servers: once with the client's
    default algorithms (what users get; OpenSSH 9.2 picks sntrup761x25519 with sshd,
    which meshsshd does not offer) and once with curve25519-sha256 pinned on both (the
    same work). Returns the figures and the per-round sshd medians with default
    algorithms, the baseline of the meshssh and proxy rows."""
    algs = {s.label: negotiated(ctx.ws, s) for s in (ctx.sshd, ctx.mesh)}
    ctx.progress(f"latency: ssh true (negotiated by default: {algs})")
    figures: list[Figure] = []
    baseline: dict[str, list[float]] = {}
    variants = (("latency ssh true (key)", ()),
                ("latency ssh true (key, curve25519 both)", ("-o", "KexAlgorithms=curve25519-sha256")))
    for name, extra in variants:
        values: dict[str, list[float]] = {"sshd": [], "meshsshd": []}
        raw: dict[str, list[float]] = {"sshd": [], "meshsshd": []}
        for r in range(ctx.rounds):
            for server in ctx.order(r):
                med, runs = latency_samples(
                    ctx, server.label, lambda s=server, e=extra: ssh_true(ctx.ws, s, *e))
                values[server.label].append(med)
                raw[server.label] += runs
                ctx.progress(f"  {name}: round {r + 1}/{ctx.rounds} {server.label} {med * 1000:.1f} ms")
            ctx.check_alive(name)
        figures.append(Figure(
            name, "s", "lower", summarize(values["sshd"]), summarize(values["meshsshd"]), None,
            note="native OpenSSH client, -F /dev/null",
            extra={**_pair_extra(values), "runs": raw, "negotiated_default": algs}))
        if not baseline:
            baseline = values
    return figures, baseline


def _drive_pool(ctx: Ctx, server: Server) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "bench.clients", "pool", "--host", server.host,
            "--port", str(server.port), "--user", ctx.ws.user, "--key", str(ctx.ws.key),
            "--kex", ctx.kex]
    pool = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    readings: list[dict[str, Any]] = []
    try:
        assert pool.stdin is not None and pool.stdout is not None
        readings.append({"sessions": 0, **_mem(server)})
        for n in ctx.sessions:
            pool.stdin.write(f"grow {n}\n")
            pool.stdin.flush()
            line = pool.stdout.readline()
            if not line:
                raise RuntimeError(f"session pool died: {pool.stderr.read() if pool.stderr else ''}")
            status = json.loads(line)
            if status["held"] < n:
                raise RuntimeError(f"{server.label}: only {status['held']}/{n} idle sessions "
                                   f"({status['first_error']})")
            reading = {"sessions": n, **_mem(server), "connect_seconds": status["seconds"]}
            readings.append(reading)
            ctx.progress(f"  memory {server.label} {n} sessions: PSS {reading['pss'] / 2**20:.1f} MiB, "
                         f"RSS {reading['rss'] / 2**20:.1f} MiB, {reading['processes']} processes")
        pool.stdin.write("quit\n")
        pool.stdin.flush()
        pool.wait(120)
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait()
    return readings


def _mem(server: Server) -> dict[str, int]:
    m = procs.tree_memory(server.pid)
    return {"rss": m.rss, "pss": m.pss, "processes": m.processes}


def measure_memory(ctx: Ctx) -> list[Figure]:
    ctx.progress(f"memory: idle sessions {ctx.sessions}")
    data: dict[str, list[list[dict[str, Any]]]] = {"sshd": [], "meshsshd": []}
    for r in range(ctx.memory_rounds):
        for server in ctx.order(r):
            base = ctx.baseline_procs(server)
            try:
                data[server.label].append(_drive_pool(ctx, server))
            except Exception:
                if server.alive():
                    raise
                ctx.check_alive("memory: holding idle sessions")
                continue
            # Closing the pool's connections all at once is a test of its own.
            time.sleep(1.0)
            if not server.alive():
                ctx.check_alive(f"memory: closing {max(ctx.sessions)} connections at once")
            else:
                settle(server, timeout=60, baseline=base)
        ctx.check_alive("memory")
    for label, runs in data.items():
        if not runs:
            raise RuntimeError(f"memory: no complete round for {label}")
    figures = []
    for i, n in enumerate(ctx.sessions, start=1):
        for kind in ("pss", "rss"):
            vals = {k: [float(run[i][kind]) for run in v] for k, v in data.items()}
            idle = {k: [float(run[0][kind]) for run in v] for k, v in data.items()}
            figures.append(Figure(
                f"memory {n} idle sessions ({kind.upper()})", "bytes", "lower",
                summarize(vals["sshd"]), summarize(vals["meshsshd"]), Target("<=", 0.1),
                note="sum over the daemon's process tree",
                extra={**_pair_extra(vals), "at_0_sessions": idle,
                       "processes": {k: [run[i]["processes"] for run in v] for k, v in data.items()}},
            ))
    if len(ctx.sessions) >= 2:
        lo, hi = ctx.sessions[0], ctx.sessions[-1]
        slope = {k: [(run[len(ctx.sessions)]["pss"] - run[1]["pss"]) / (hi - lo) for run in v]
                 for k, v in data.items()}
        figures.append(Figure(
            f"memory per extra idle session (PSS, {lo}→{hi})", "bytes", "lower",
            summarize(slope["sshd"]), summarize(slope["meshsshd"]), None,
            note="marginal cost of one more idle session; the fixed footprint left out",
            extra=_pair_extra(slope)))
    return figures


def _login_burst(ctx: Ctx, server: Server) -> tuple[float, float, dict[str, Any]]:
    """(logins/s, server CPU ms per login, details) for one burst of login_seconds."""
    per = [ctx.login_concurrency // ctx.login_procs] * ctx.login_procs
    per[0] += ctx.login_concurrency - sum(per)
    base = [sys.executable, "-m", "bench.clients", "logins", "--host", server.host,
            "--port", str(server.port), "--user", ctx.ws.user, "--key", str(ctx.ws.key),
            "--kex", ctx.kex, "--seconds", str(ctx.login_seconds)]
    c0 = server.cpu_seconds()
    clients = [subprocess.Popen(base + ["--concurrency", str(c)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for c in per]
    results = []
    try:
        for c in clients:
            out, err = c.communicate(timeout=ctx.login_seconds + 180)
            if c.returncode != 0 or not out.strip():
                raise RuntimeError(f"login client failed: {err[-400:]}")
            results.append(json.loads(out))
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
    settle(server, timeout=30)
    cpu = server.cpu_seconds() - c0
    ok = sum(r["ok"] for r in results)
    failed = sum(r["failed"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    details = {"ok": ok, "failed": failed, "elapsed": elapsed,
               "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
               "login_latency_median": lat[len(lat) // 2] if lat else None,
               "server_cpu_seconds": cpu}
    return ok / elapsed, (cpu / ok * 1000 if ok else float("nan")), details


def measure_logins(ctx: Ctx) -> list[Figure]:
    ctx.progress(f"logins/s: {ctx.login_concurrency} concurrent asyncssh clients, "
                 f"{ctx.login_seconds:g} s per burst")
    rates: dict[str, list[float]] = {"sshd": [], "meshsshd": []}
    cpu_ms: dict[str, list[float]] = {"sshd": [], "meshsshd": []}
    details: dict[str, list[dict[str, Any]]] = {"sshd": [], "meshsshd": []}
    for r in range(ctx.rounds):
        for server in ctx.order(r):
            rate, ms, det = _login_burst(ctx, server)
            rates[server.label].append(rate)
            cpu_ms[server.label].append(ms)
            details[server.label].append(det)
            ctx.progress(f"  logins: round {r + 1}/{ctx.rounds} {server.label} {rate:.1f}/s "
                         f"({det['failed']} failed), server CPU {ms:.1f} ms/login")
            ctx.check_alive("logins")
    return [
        Figure(f"logins/s ({ctx.login_concurrency} concurrent)", "/s", "higher", summarize(rates["sshd"]),
               summarize(rates["meshsshd"]), Target(">=", 2.0),
               note="connect + key auth + exec true + close; asyncssh clients on the same box",
               extra={**_pair_extra(rates), "bursts": details}),
        Figure("login: server CPU per login", "ms", "lower", summarize(cpu_ms["sshd"]),
               summarize(cpu_ms["meshsshd"]), None, extra=_pair_extra(cpu_ms)),
    ]


def memory_after_run(ctx: Ctx) -> list[Figure]:
    """Both daemons' memory with no connection, after everything else ran: a
    long-running Python daemon keeps the high-water mark of its heap (transfer buffers),
    sshd's listener does not grow. One reading, no rounds; informational."""
    out = []
    for s in (ctx.sshd, ctx.mesh):
        settle(s, timeout=10)
    for kind in ("pss", "rss"):
        vals = {s.label: float(getattr(procs.tree_memory(s.pid), kind)) for s in (ctx.sshd, ctx.mesh)}
        out.append(Figure(f"memory after the run, 0 sessions ({kind.upper()})", "bytes", "lower",
                          summarize([vals["sshd"]]), summarize([vals["meshsshd"]]), None,
                          note="one reading after all measurements"))
    return out
