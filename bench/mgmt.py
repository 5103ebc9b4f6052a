"""Measurement 6: the management figures, computed by bench/mgmt_bench.py.

mgmt_bench.py belongs to the management side (it knows how to build 10 000 peers and
1 000 policies and how to hold 1 000 sync streams); this module only runs it in its own
process and turns its JSON into Figures with the absolute targets of issue 3
(map computation ≤ 1 s; change propagation to 1 000 streams ≤ 2 s p99).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from .stats import Figure, Target, summarize

SCRIPT = Path(__file__).resolve().parent / "mgmt_bench.py"
REPO = SCRIPT.parent.parent


def _seconds(doc: dict[str, Any], *keys: str) -> list[float] | None:
    """The first key present: a number or a list of numbers (seconds)."""
    for k in keys:
        v = doc.get(k)
        if isinstance(v, (int, float)):
            return [float(v)]
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            return [float(x) for x in v]
    return None


def figures_from(doc: dict[str, Any]) -> list[Figure]:
    """Accept the shapes mgmt_bench.py may print: flat keys or a "figures" mapping."""
    flat = {**doc, **(doc.get("figures") if isinstance(doc.get("figures"), dict) else {})}
    peers = (doc.get("compute") or {}).get("peers", 10_000)
    policies = (doc.get("compute") or {}).get("policies", 1_000)
    streams = (doc.get("propagation") or {}).get("streams", 1_000)
    out: list[Figure] = []
    compute = _seconds(flat, "map_compute_seconds", "compute_seconds", "map_seconds")
    if compute:
        out.append(Figure(f"mgmt: map computation ({peers} peers, {policies} policies)", "s", "lower",
                          None, summarize(compute), Target("<=", 1.0, "absolute"),
                          note="one peer's map from a fresh snapshot", extra={"raw": doc}))
    prop = _seconds(flat, "propagation_p99_seconds", "p99_seconds", "propagation_p99")
    if prop:
        out.append(Figure(f"mgmt: change → {streams} sync streams (p99)", "s", "lower",
                          None, summarize(prop), Target("<=", 2.0, "absolute"),
                          note="p99 over streams, one sample per policy change", extra={"raw": doc}))
    return out


def not_measured(reason: str) -> list[Figure]:
    return [
        Figure("mgmt: map computation (10k peers, 1k policies)", "s", "lower",
               target=Target("<=", 1.0, "absolute"), note=reason),
        Figure("mgmt: change → 1000 sync streams (p99)", "s", "lower",
               target=Target("<=", 2.0, "absolute"), note=reason),
    ]


def measure_mgmt(ctx: Any, extra_args: str = "") -> list[Figure]:
    if not SCRIPT.exists():
        return not_measured("bench/mgmt_bench.py does not exist yet")
    ctx.progress("management figures (bench/mgmt_bench.py)")
    argv = [sys.executable, str(SCRIPT), "--json", "--rounds", str(ctx.rounds), *shlex.split(extra_args)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        # Keep what can be had: the map computation alone, and say why propagation is missing.
        why = f"mgmt_bench.py exited {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"
        ctx.notes.append(why)
        done = subprocess.run(argv + ["--skip-propagation"], cwd=REPO, capture_output=True, text=True,
                              timeout=1200)
        if done.returncode != 0:
            return not_measured(why)
        lines = [ln for ln in done.stdout.splitlines() if ln.strip().startswith("{")]
        figures = figures_from(json.loads(lines[-1])) if lines else []
        return figures + not_measured(why)[1:]
    lines = [ln for ln in done.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        return not_measured("mgmt_bench.py printed no JSON")
    figures = figures_from(json.loads(lines[-1]))
    return figures or not_measured("mgmt_bench.py's JSON has no figures this harness knows")


__all__ = ["measure_mgmt", "figures_from", "not_measured"]
