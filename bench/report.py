"""Writing a run down: the JSON file in bench/out/ and the generated part of RESULTS.md.

RESULTS.md is half generated, half written by people: only the text between the
`<!-- generated:begin -->` and `<!-- generated:end -->` markers is replaced, so the
"Profiles and what bounds us" notes survive every run. The previous run's per-figure
digest sits in a comment inside the generated block; the next run diffs against it
("What changed since last run"), which works from a fresh clone where bench/out/ is empty.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .machine import one_line
from .stats import Figure, diff_runs, digest, format_table

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
RESULTS_MD = BENCH_DIR / "RESULTS.md"

BEGIN = "<!-- generated:begin -->"
END = "<!-- generated:end -->"
_DIGEST_RE = re.compile(r"<!-- digest: (\{.*?\}) -->", re.S)


def write_json(figures: Sequence[Figure], machine: dict[str, Any], params: dict[str, Any],
               notes: Sequence[str], stamp: str, out_dir: Path = OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"results-{stamp}.json"
    doc = {
        "timestamp": stamp,
        "machine": machine,
        "parameters": params,
        "notes": list(notes),
        "figures": [f.to_dict() for f in figures],
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def previous_digest(text: str) -> dict[str, Any]:
    m = _DIGEST_RE.search(text)
    if not m:
        return {}
    try:
        return json.loads(m.group(1))
    except json.JSONDecodeError:
        return {}


def generated_block(figures: Sequence[Figure], machine: dict[str, Any], params: dict[str, Any],
                    notes: Sequence[str], stamp: str, previous: dict[str, Any]) -> str:
    current = digest(figures)
    lines = [
        BEGIN,
        f"## Latest run ({stamp})",
        "",
        f"Machine: {one_line(machine)}.",
        f"Load average at start / end: {_load(machine.get('loadavg_start'))} / "
        f"{_load(machine.get('loadavg_end'))}; run took {machine.get('duration_seconds', '?')} s.",
        f"Parameters: {', '.join(f'{k}={v}' for k, v in params.items())}.",
        "",
        format_table(figures),
        "",
    ]
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    lines += ["## What changed since last run", ""]
    lines += diff_runs(previous, current) if previous else ["- first recorded run"]
    lines += ["", f"<!-- digest: {json.dumps(current, separators=(',', ':'))} -->", END]
    return "\n".join(lines)


def _load(avg: Any) -> str:
    try:
        return " ".join(f"{x:.1f}" for x in avg)
    except TypeError:
        return "?"


def update_results_md(figures: Sequence[Figure], machine: dict[str, Any], params: dict[str, Any],
                      notes: Sequence[str], stamp: str, path: Path = RESULTS_MD) -> None:
    text = path.read_text() if path.exists() else ""
    block = generated_block(figures, machine, params, notes, stamp, previous_digest(text))
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = ("# Benchmarks: meshsshd vs OpenSSH sshd\n\n"
                "Run with `python -m bench` (see docs/bench.md). Ratios are meshsshd / sshd, "
                "measured in the same run.\n\n" + block + "\n\n## Profiles and what bounds us\n\n")
    path.write_text(text)


def stamp_now() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
