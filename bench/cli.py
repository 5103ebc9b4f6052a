"""`python -m bench`: start sshd and meshsshd side by side, run the measurements,
print the table, write bench/out/results-<stamp>.json and refresh bench/RESULTS.md."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import machine, measure, report
from .servers import Server, Workspace
from .stats import Figure, format_table, parse_size

# Memory first: it is measured on daemons that have not yet served a bulk transfer; the
# memory both hold after the whole run is reported at the end ("memory after the run").
MEASUREMENTS = ("memory", "logins", "latency", "bulk", "sftp", "mgmt")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="meshsshd vs OpenSSH sshd on this machine, same run, ratios meshsshd/sshd.",
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds per measurement (default 5)")
    p.add_argument("--size", default="1G", help="bytes per bulk/sftp transfer (default 1G; e.g. 64M)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these ({', '.join(MEASUREMENTS)}); repeat or comma-separate")
    p.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave these out")
    p.add_argument("--latency-runs", type=int, default=10, help="`ssh true` runs per round and server")
    p.add_argument("--sessions", default="100,500,1000", help="idle-session levels for memory")
    p.add_argument("--memory-rounds", type=int, default=None,
                   help="rounds for memory (default: min(rounds, 3); its readings vary by <1%%)")
    p.add_argument("--login-seconds", type=float, default=10.0, help="length of one login burst")
    p.add_argument("--login-concurrency", type=int, default=50)
    p.add_argument("--login-procs", type=int, default=2,
                   help="client processes sharing the concurrency (the client needs CPU too)")
    p.add_argument("--kex", default="curve25519-sha256",
                   help="key exchange of the asyncssh load clients ('' = asyncssh's default)")
    p.add_argument("--max-startups", type=int, default=100,
                   help="unauthenticated-connection allowance given to both servers")
    p.add_argument("--mesh-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for meshsshd serve, for experiments (recorded in the JSON)")
    p.add_argument("--whatif", action="store_true",
                   help="start meshsshd through bench/whatif.py (switches via --mesh-env MESHBENCH_*)")
    p.add_argument("--self-check", action="store_true",
                   help="A/A run: a second sshd stands in for meshsshd (ratios should be ~1)")
    p.add_argument("--no-results-md", action="store_true", help="do not rewrite bench/RESULTS.md")
    p.add_argument("--mgmt-args", default="", help="extra arguments for bench/mgmt_bench.py")
    return p


def _selected(args: argparse.Namespace) -> list[str]:
    def split(items: Sequence[str]) -> list[str]:
        return [x.strip() for item in items for x in item.split(",") if x.strip()]

    only, skip = split(args.only), split(args.skip)
    for name in only + skip:
        if name not in MEASUREMENTS:
            raise SystemExit(f"unknown measurement {name!r}; choose from {', '.join(MEASUREMENTS)}")
    return [m for m in MEASUREMENTS if (not only or m in only) and m not in skip]


def _raise_fd_limit() -> None:
    """1000 idle sessions need more than the default 1024 descriptors in the daemon and
    in the client pool; both inherit this limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    selected = _selected(args)
    size = parse_size(args.size)
    sessions = tuple(int(x) for x in args.sessions.split(",") if x.strip())
    params = {"rounds": args.rounds, "size": args.size, "measurements": ",".join(selected),
              "latency_runs": args.latency_runs, "sessions": args.sessions,
              "login_seconds": args.login_seconds, "login_concurrency": args.login_concurrency,
              "login_procs": args.login_procs,
              "memory_rounds": args.memory_rounds or min(args.rounds, 3), "kex": args.kex or "default",
              "max_startups": args.max_startups}
    mesh_env = dict(kv.split("=", 1) for kv in args.mesh_env)
    if mesh_env:
        params["mesh_env"] = " ".join(args.mesh_env)
    if args.whatif:
        params["whatif"] = True
    desc = machine.describe()
    _progress(f"machine: {machine.one_line(desc)}")
    _raise_fd_limit()
    figures: list[Figure] = []
    notes: list[str] = []
    t_start = time.monotonic()
    stamp = report.stamp_now()
    ws = Workspace.create()
    try:
        sshd = ws.start_sshd(args.max_startups)
        if args.self_check:
            mesh = ws.start_sshd(args.max_startups, label="meshsshd")
            notes.append("self-check: the meshsshd column is a second OpenSSH sshd")
        else:
            mesh = ws.start_meshsshd(args.max_startups, env=mesh_env, whatif=args.whatif)
        _progress(f"user {ws.user}; sshd on :{sshd.port} (pid {sshd.pid}), "
                  f"meshsshd on :{mesh.port} (pid {mesh.pid})")
        ctx = measure.Ctx(
            ws=ws, sshd=sshd, mesh=mesh, rounds=args.rounds, size=size,
            latency_runs=args.latency_runs, sessions=sessions, login_seconds=args.login_seconds,
            login_concurrency=args.login_concurrency, login_procs=args.login_procs,
            kex=args.kex, progress=_progress, notes=notes, restart=_restarter(ws, args),
            memory_rounds=args.memory_rounds or min(args.rounds, 3),
        )
        for name in selected:
            ctx.check_alive(f"the time before {name}")
            t0 = time.monotonic()
            try:
                figures += _measure(name, ctx, args)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one broken measurement must not lose the others
                notes.append(f"{name}: failed: {exc}")
                _progress(f"{name} FAILED: {exc}")
            _progress(f"{name} took {time.monotonic() - t0:.0f} s")
        ctx.check_alive("the last measurement")
        figures += measure.memory_after_run(ctx)
    finally:
        ws.close(keep_logs_in=report.OUT_DIR, stamp=stamp)
    desc["loadavg_end"] = os.getloadavg()
    desc["duration_seconds"] = round(time.monotonic() - t_start, 1)
    print(format_table(figures))
    for n in notes:
        print(f"note: {n}")
    path = report.write_json(figures, desc, params, notes, stamp)
    _progress(f"wrote {path}")
    if not (args.no_results_md or args.only or args.self_check or args.whatif or args.mesh_env):
        report.update_results_md(figures, desc, params, notes, stamp)
        _progress(f"updated {report.RESULTS_MD}")
    return 0


def _restarter(ws: Workspace, args: argparse.Namespace) -> Any:
    def restart(label: str) -> Server:
        report.OUT_DIR.mkdir(parents=True, exist_ok=True)
        old = ws.servers[label]
        shutil.copy(old.log, report.OUT_DIR / f"{report.stamp_now()}-{label}-died.log")
        if label == "sshd" or args.self_check:
            return ws.start_sshd(args.max_startups, label=label)
        return ws.start_meshsshd(args.max_startups, env=dict(kv.split("=", 1) for kv in args.mesh_env),
                                 whatif=args.whatif)
    return restart


def _measure(name: str, ctx: measure.Ctx, args: argparse.Namespace) -> list[Figure]:
    if name == "bulk":
        return measure.measure_bulk(ctx)
    if name == "sftp":
        return measure.measure_sftp(ctx)
    if name == "latency":
        from . import managed
        native, baseline = measure.measure_latency_native(ctx)
        return [*native, *managed.measure_managed_latency(ctx, native[0].sshd, baseline)]
    if name == "memory":
        return measure.measure_memory(ctx)
    if name == "logins":
        return measure.measure_logins(ctx)
    if name == "mgmt":
        from . import mgmt
        return mgmt.measure_mgmt(ctx, args.mgmt_args)
    raise ValueError(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(args)
    except KeyboardInterrupt:
        _progress("interrupted; cleaned up")
        return 130
