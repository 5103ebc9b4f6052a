"""The pure core of the benchmark: summaries, ratios, verdicts, tables and run diffs.

Everything here is a function over plain values so that it can be unit-tested without
starting a server (tests/unit/test_bench_stats.py). The I/O edges (processes, clocks,
files) live in the other `bench` modules and only hand lists of floats to this one.

Ratios are always meshsshd / sshd, as the issue defines them, whatever the direction:
for throughput (MB/s, logins/s) a ratio above 1 is good; for latency and memory a ratio
below 1 is good. A `Target` therefore carries its own comparison operator.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure's samples (one sample per round)."""

    n: int
    median: float
    min: float
    max: float
    q1: float
    q3: float
    samples: tuple[float, ...] = ()

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples"] = list(self.samples)
        return d


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), defined for n=1."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    frac = pos - lo
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * frac


def summarize(samples: Iterable[float]) -> Summary:
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("no samples to summarize")
    return Summary(
        n=len(xs),
        median=statistics.median(xs),
        min=xs[0],
        max=xs[-1],
        q1=_quantile(xs, 0.25),
        q3=_quantile(xs, 0.75),
        samples=tuple(xs),
    )


def percentile(samples: Iterable[float], q: float) -> float:
    """q in [0, 100]; used for p99 figures (management propagation)."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("no samples")
    return _quantile(xs, q / 100.0)


@dataclass(frozen=True)
class Target:
    """A goal for a figure. kind "ratio" compares meshsshd/sshd; "absolute" compares the
    meshsshd (or management) median itself, e.g. "map computation ≤ 1 s"."""

    op: Literal[">=", "<="]
    value: float
    kind: Literal["ratio", "absolute"] = "ratio"

    def holds(self, x: float) -> bool:
        return x >= self.value if self.op == ">=" else x <= self.value

    def describe(self) -> str:
        return f"{self.op} {self.value:g}" + ("" if self.kind == "ratio" else " (abs)")


@dataclass(frozen=True)
class Figure:
    """One row of the table. `sshd` is the baseline (None for management figures),
    `mesh` the candidate (None when it could not be measured, with `note` saying why)."""

    name: str
    unit: str
    better: Better
    sshd: Summary | None = None
    mesh: Summary | None = None
    target: Target | None = None
    note: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return ratio(self.mesh, self.sshd)

    @property
    def verdict(self) -> str:
        return verdict(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "better": self.better,
            "sshd": self.sshd.to_dict() if self.sshd else None,
            "meshsshd": self.mesh.to_dict() if self.mesh else None,
            "ratio": self.ratio,
            "target": asdict(self.target) if self.target else None,
            "verdict": self.verdict,
            "note": self.note,
            "extra": dict(self.extra),
        }


def ratio(mesh: Summary | None, sshd: Summary | None) -> float | None:
    """meshsshd median / sshd median, or None when either side is missing or zero."""
    if mesh is None or sshd is None or sshd.median == 0:
        return None
    return mesh.median / sshd.median


def paired_ratios(mesh: Sequence[float], sshd: Sequence[float]) -> list[float]:
    """Round-by-round ratios: rounds alternate servers, so a pair shares the machine's
    load of that moment and its ratio is steadier than the ratio of medians."""
    return [m / s for m, s in zip(mesh, sshd) if s]


def verdict(fig: Figure) -> str:
    """"ok" / "MISS" against the target, "n/a" without one, "not measured" without data."""
    if fig.mesh is None:
        return "not measured"
    if fig.target is None:
        return "n/a"
    if fig.target.kind == "absolute":
        return "ok" if fig.target.holds(fig.mesh.median) else "MISS"
    r = fig.ratio
    if r is None:
        return "not measured"
    return "ok" if fig.target.holds(r) else "MISS"


# --- formatting -------------------------------------------------------------------------


def fmt_value(x: float | None, unit: str) -> str:
    """Human units: bytes become MiB, seconds become ms below 1 s."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if unit == "bytes":
        return f"{x / 2**20:.1f} MiB" if abs(x) >= 2**20 else f"{x / 2**10:.1f} KiB"
    if unit == "s":
        return f"{x * 1000:.1f} ms" if abs(x) < 1 else f"{x:.2f} s"
    if abs(x) >= 100:
        return f"{x:.0f} {unit}"
    return f"{x:.3g} {unit}"


def fmt_summary(s: Summary | None, unit: str) -> str:
    if s is None:
        return "—"
    if s.n == 1:
        return fmt_value(s.median, unit)
    return f"{fmt_value(s.median, unit)} ({_bare(s.min, unit)}–{_bare(s.max, unit)})"


def _bare(x: float, unit: str) -> str:
    """A spread bound without its unit (the median beside it carries it)."""
    return fmt_value(x, unit).rsplit(" ", 1)[0]


def one_line(text: str, limit: int = 100) -> str:
    """A note fit for a table cell: one line, at most `limit` characters."""
    flat = " ".join(text.split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}"


TABLE_HEADER = ("figure", "sshd median (min–max)", "meshsshd median (min–max)", "ratio", "target", "verdict")


def table_rows(figures: Sequence[Figure]) -> list[tuple[str, ...]]:
    rows = []
    for f in figures:
        verdict_text = f.verdict
        if f.note and f.mesh is None:
            verdict_text = f"not measured: {one_line(f.note)}"
        rows.append((
            f.name,
            fmt_summary(f.sshd, f.unit),
            fmt_summary(f.mesh, f.unit),
            fmt_ratio(f.ratio),
            f.target.describe() if f.target else "",
            verdict_text,
        ))
    return rows


def format_table(figures: Sequence[Figure]) -> str:
    """A Markdown pipe table; also readable on a terminal."""
    rows = [TABLE_HEADER, *table_rows(figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows[1:]]
    return "\n".join(out)


# --- comparing with the previous run -------------------------------------------------------


def digest(figures: Sequence[Figure]) -> dict[str, dict[str, float | None]]:
    """The compact per-figure values kept in RESULTS.md for the next run's diff."""
    return {
        f.name: {
            "sshd": f.sshd.median if f.sshd else None,
            "meshsshd": f.mesh.median if f.mesh else None,
            "ratio": f.ratio,
        }
        for f in figures
    }


def diff_runs(
    previous: Mapping[str, Mapping[str, float | None]],
    current: Mapping[str, Mapping[str, float | None]],
    threshold: float = 0.10,
) -> list[str]:
    """Lines saying which ratios moved by more than `threshold` (relative), which figures
    are new and which disappeared. Ratios, not absolute values: the machine is shared."""
    lines: list[str] = []
    for name, cur in current.items():
        prev = previous.get(name)
        c = cur.get("ratio")
        if prev is None:
            lines.append(f"- {name}: new figure (ratio {fmt_ratio(c)})")
            continue
        p = prev.get("ratio")
        if p is None and c is None:
            continue
        if p is None or c is None:
            lines.append(f"- {name}: ratio {fmt_ratio(p)} → {fmt_ratio(c)}")
            continue
        if p == 0:
            continue
        change = (c - p) / abs(p)
        if abs(change) >= threshold:
            lines.append(f"- {name}: ratio {p:.2f} → {c:.2f} ({change:+.0%})")
    for name in previous:
        if name not in current:
            lines.append(f"- {name}: not in this run")
    return lines or [f"- no ratio moved by {threshold:.0%} or more"]


_SIZE_RE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """"1G", "64M", "512MiB", "1000" → bytes (binary multiples, as `head -c 1G`)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _SIZE_RE_UNITS else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        value = float(number)
    except ValueError as exc:
        raise ValueError(f"not a size: {text!r}") from exc
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * _SIZE_RE_UNITS[unit])
