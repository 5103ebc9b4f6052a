"""How many log lines of one kind a client may cause.

A logged-in client can ask for refused forwards as fast as it can send packets; every
request must still be answered, but the log (and whoever reads it later) needs only a few
lines and the count of the rest. A token bucket per key (the source address): `burst`
lines at once, then `rate` per second; the next line written says how many were held
back. The clock comes in as an argument, so tests are exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    last: float
    held: int = 0


@dataclass
class LogBudget:
    burst: int = 10
    rate: float = 1.0
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 4096   # beyond this, full buckets (idle keys) are forgotten
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str) -> int | None:
        """None: hold this line back; else write it, with this many held back before it."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_idle(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.last) * self.rate)
        bucket.last = now
        if bucket.tokens < 1.0:
            bucket.held += 1
            return None
        bucket.tokens -= 1.0
        held, bucket.held = bucket.held, 0
        return held

    def _forget_idle(self, now: float) -> None:
        refill = self.burst / self.rate if self.rate > 0 else float("inf")
        for key in [k for k, b in self._buckets.items() if now - b.last >= refill and not b.held]:
            del self._buckets[key]
