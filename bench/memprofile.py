"""What a daemon's memory consists of: bench/RESULTS.md ("Memory") quotes these tables.

    python -m bench.memprofile maps PID      # PSS/RSS per mapping group, from /proc/PID/smaps
    python -m bench.memprofile imports       # RSS each import of `meshsshd serve` adds

`maps` groups the mappings of one process: the Python heap (anonymous memory and
[heap]), the interpreter, each site-packages distribution's extension modules, the
stdlib's extension modules, and system libraries. `imports` imports `meshsshd serve`'s
modules one after another and records what each adds to RSS: the fixed base that
exists before the first connection.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

# What `meshsshd serve` imports, dependencies first (see `imports`).
SERVE_IMPORTS = ("asyncio", "cryptography.hazmat.bindings._rust", "asyncssh", "jwt", "click", "uvloop",
                 "meshsshd.cli", "meshsshd.server")
_SITE = re.compile(r"/site-packages/([^/]+)")
_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def _group(path: str) -> str:
    if not path or path.startswith("[anon") or path == "[heap]":
        return "anonymous (Python objects, malloc arenas)"
    if path.startswith("["):
        return path
    m = _SITE.search(path)
    if m:
        return f"site-packages/{m.group(1).split('.')[0]}"
    if "/lib-dynload/" in path:
        return "stdlib extension modules"
    if "libpython" in path or re.search(r"/bin/python3?[.0-9]*$", path):
        return "python interpreter"
    return path.rsplit("/", 1)[-1].split(".so")[0] + " (system library)"


def maps(pid: int) -> list[tuple[str, int, int]]:
    """(group, PSS bytes, RSS bytes) of process `pid`, largest PSS first."""
    pss: dict[str, int] = defaultdict(int)
    rss: dict[str, int] = defaultdict(int)
    group = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if _HEADER.match(line):
                parts = line.split(None, 5)
                group = _group(parts[5].strip() if len(parts) > 5 else "")
            elif line.startswith("Pss:"):
                pss[group] += int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss[group] += int(line.split()[1]) * 1024
    return sorted(((g, pss[g], rss[g]) for g in pss), key=lambda t: -t[1])


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def imports(modules: list[str]) -> list[tuple[str, int]]:
    """(module, RSS bytes) each import in `modules` adds, in order, after the interpreter's
    own start. Each row counts what that import brings beyond the rows before it, so list
    dependencies first (asyncio before asyncssh) to see each package's own share."""
    import importlib

    rows = [("interpreter start", _rss())]
    for name in modules:
        before = _rss()
        importlib.import_module(name)
        rows.append((name, _rss() - before))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memprofile", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("maps", help="PSS/RSS per mapping group of a running process")
    p.add_argument("pid", type=int)
    p = sub.add_parser("imports", help="RSS each import of the daemon adds")
    p.add_argument("modules", nargs="*", default=list(SERVE_IMPORTS))
    args = parser.parse_args()
    mib = 2 ** 20
    if args.what == "maps":
        rows = maps(args.pid)
        print(f"{'mapping group':50s} {'PSS MiB':>8s} {'RSS MiB':>8s}")
        for group, pss, rss in rows:
            if rss >= mib // 10:
                print(f"{group:50s} {pss / mib:8.1f} {rss / mib:8.1f}")
        print(f"{'total':50s} {sum(r[1] for r in rows) / mib:8.1f} {sum(r[2] for r in rows) / mib:8.1f}")
    else:
        rows = imports(args.modules)
        print(f"{'import (adds)':40s} {'RSS MiB':>8s}")
        for name, rss in rows:
            print(f"{name:40s} {rss / mib:8.1f}")
        print(f"{'total':40s} {sum(r[1] for r in rows) / mib:8.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
