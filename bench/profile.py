"""Where meshsshd's time goes: py-spy on `meshsshd serve` under one load.

    python -m bench.profile logins   [--seconds 10]       # 50 concurrent key logins
    python -m bench.profile upload   [--size 1G] [--cipher aes128-gcm@openssh.com]
    python -m bench.profile download [--size 1G]
    python -m bench.profile sftp-put|sftp-get [--size 1G]

Starts a throwaway user and `meshsshd serve` (bench/servers.py), samples it with
`py-spy record --format raw` (install py-spy into the venv) while the load runs, and
prints the functions with the most samples: "self" (on top of the stack) and
"total" (anywhere on the stack). The collapsed stacks are kept in bench/out/ for a
flame graph (e.g. speedscope or inferno). Not a test; needs root.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import transfer
from .report import OUT_DIR, stamp_now
from .servers import Server, Workspace
from .stats import parse_size

REPO = Path(__file__).resolve().parent.parent


def summarize_collapsed(text: str, top: int = 25) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """(self counts, total counts, samples) from py-spy's collapsed 'a;b;c N' lines."""
    self_c: collections.Counter[str] = collections.Counter()
    total_c: collections.Counter[str] = collections.Counter()
    n = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        n += count
        self_c[frames[-1]] += count
        for f in set(frames):
            total_c[f] += count
    return self_c.most_common(top), total_c.most_common(top), n


def _load(kind: str, ws: Workspace, server: Server, args: argparse.Namespace) -> None:
    size = parse_size(args.size)
    if kind == "logins":
        out = subprocess.run(
            [sys.executable, "-m", "bench.clients", "logins", "--port", str(server.port),
             "--user", ws.user, "--key", str(ws.key), "--seconds", str(args.seconds),
             "--concurrency", "50"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        doc = json.loads(out)
        print(f"logins: {doc['ok']} ok, {doc['failed']} failed in {doc['elapsed']:.1f} s", file=sys.stderr)
    elif kind == "upload":
        print(f"upload {transfer.upload(ws, server, args.cipher, size):.2f} s", file=sys.stderr)
    elif kind == "download":
        print(f"download {transfer.download(ws, server, args.cipher, size):.2f} s", file=sys.stderr)
    elif kind in ("sftp-put", "sftp-get"):
        src = transfer.sparse_file(ws.scratch / "profile-src", size)
        fn = transfer.sftp_put if kind == "sftp-put" else transfer.sftp_get
        print(f"{kind} {fn(ws, server, src, args.cipher):.2f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("load", choices=("logins", "upload", "download", "sftp-put", "sftp-get"))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--size", default="1G")
    p.add_argument("--cipher", default=transfer.CIPHERS[0])
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--mesh-env", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    ws = Workspace.create()
    try:
        server = ws.start_meshsshd(100, env=dict(kv.split("=", 1) for kv in args.mesh_env))
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        out = OUT_DIR / f"profile-{args.load}-{stamp_now()}.txt"
        spy = subprocess.Popen([pyspy, "record", "-p", str(server.pid), "-r", str(args.rate),
                                "--format", "raw", "-o", str(out), "--subprocesses", "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        c0 = server.cpu_seconds()
        t0 = time.perf_counter()
        _load(args.load, ws, server, args)
        wall = time.perf_counter() - t0
        cpu = server.cpu_seconds() - c0
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(60)
        text = out.read_text() if out.exists() else ""
        self_top, total_top, n = summarize_collapsed(text, args.top)
        print(f"{args.load}: wall {wall:.2f} s, daemon tree CPU {cpu:.2f} s, {n} samples -> {out}")
        print("\nself (top of stack):")
        for name, c in self_top:
            print(f"  {100 * c / max(n, 1):5.1f}%  {name}")
        print("\ntotal (anywhere on stack):")
        for name, c in total_top:
            print(f"  {100 * c / max(n, 1):5.1f}%  {name}")
    finally:
        ws.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
