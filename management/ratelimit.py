"""A small in-memory token-bucket rate limiter, keyed by a string (client IP, user code).

Used for peer registration here and for login / device-code polling in the issuer:

    limiter = RateLimiter(rate=1.0, burst=10)       # 10 at once, then 1 per second
    decision = limiter.hit(request.remote or "?")
    if not decision.allowed: -> 429 with Retry-After: decision.retry_after

Per process: with several replicas each one limits on its own, which is the usual
trade-off for brute-force throttling (the limit per replica still bounds the total).
The clock is injectable for tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0  # seconds until one more hit would be allowed

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


class RateLimiter:
    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)

    def hit(self, key: str, cost: float = 1.0) -> Decision:
        """Take `cost` tokens from `key`'s bucket if it has them."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= cost:
            self._store(key, tokens - cost, now)
            return Decision(True)
        self._store(key, tokens, now)
        return Decision(False, (cost - tokens) / self.rate)

    def allow(self, key: str) -> bool:
        return self.hit(key).allowed

    def reset(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled completely (they behave like new ones)."""
        full_after = self.burst / self.rate
        for k, (_, last) in list(self._buckets.items()):
            if now - last >= full_after:
                del self._buckets[k]
        if len(self._buckets) > self._max_keys:  # still too many: drop the oldest half
            for k, _ in sorted(self._buckets.items(), key=lambda kv: kv[1][1])[: len(self._buckets) // 2]:
                del self._buckets[k]
