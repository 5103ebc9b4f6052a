"""Prometheus metrics in the text exposition format, hand-written (no extra dependency).

    METRICS.counter("meshmgmt_maps_computed_total", "...").inc()
    METRICS.gauge("meshmgmt_peers_connected", "...").set(3)
    METRICS.histogram("meshmgmt_map_compute_seconds", "...").observe(0.002)
    METRICS.render() -> str  # for GET /metrics

Labels are passed as keyword arguments to inc/set/observe. One registry per app (so
tests with several apps in one process do not mix numbers).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str], extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = sorted(labels.items()) + list(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str) -> None:
        self.name = name
        self.help = help_
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_: str) -> None:
        super().__init__(name, help_)
        self._values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(dict(k))} {_num(v)}" for k, v in sorted(self._values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] = value


class CallbackGauge(_Metric):
    """A gauge read at scrape time (e.g. the number of open sync streams)."""

    kind = "gauge"

    def __init__(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        super().__init__(name, help_)
        self.fn = fn

    def lines(self) -> list[str]:
        return [f"{self.name} {_num(self.fn())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...] = _BUCKETS) -> None:
        super().__init__(name, help_)
        self.buckets = buckets
        self._counts = [0] * len(buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self._counts[i] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def lines(self) -> list[str]:
        out = [f'{self.name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self._counts)]
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self._count}')
        out.append(f"{self.name}_sum {_num(self._sum)}")
        out.append(f"{self.name}_count {self._count}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._extra: list[Callable[[], str]] = []

    def _get(self, cls: type, name: str, help_: str, *args: object) -> _Metric:
        m = self._metrics.get(name)
        if m is None:
            m = cls(name, help_, *args)
            self._metrics[name] = m
        return m

    def counter(self, name: str, help_: str = "") -> Counter:
        return self._get(Counter, name, help_)  # type: ignore[return-value]

    def gauge(self, name: str, help_: str = "") -> Gauge:
        return self._get(Gauge, name, help_)  # type: ignore[return-value]

    def histogram(self, name: str, help_: str = "") -> Histogram:
        return self._get(Histogram, name, help_)  # type: ignore[return-value]

    def callback_gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        self._metrics[name] = CallbackGauge(name, help_, fn)

    def add_text_source(self, fn: Callable[[], str]) -> None:
        """Another component's own exposition text (e.g. the issuer's grant counters)."""
        self._extra.append(fn)

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines += m.header() + m.lines()  # type: ignore[attr-defined]
        text = "\n".join(lines) + "\n"
        for fn in self._extra:
            extra = fn()
            if extra:
                text += extra if extra.endswith("\n") else extra + "\n"
        return text
