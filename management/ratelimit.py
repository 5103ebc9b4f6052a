"""Small in-memory throttles keyed by a string (client IP, user code, email + client).

`RateLimiter` is a token bucket, used for peer registration here and for login /
device-code polling in the issuer:

    limiter = RateLimiter(rate=1.0, burst=10)       # 10 at once, then 1 per second
    decision = limiter.hit(request.remote or "?")
    if not decision.allowed: -> 429 with Retry-After: decision.retry_after

`Backoff` is an exponential delay after failures (sign-in): each failure doubles the
wait before the next attempt, up to a cap; a success forgets the key.

Per process: with several replicas each one limits on its own, which is the usual
trade-off for brute-force throttling (the limit per replica still bounds the total).
The clock is injectable for tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0  # seconds until one more hit would be allowed
    reason: str = ""  # which throttle refused, for metrics and logs (when several apply)

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


def prune(entries: dict[str, tuple[Any, float]], now: float, idle: float, max_keys: int) -> None:
    """Bound memory of a `key -> (value, last seen)` map once it holds more than
    `max_keys`: forget keys idle for `idle` seconds, then, if still too many, the
    oldest half (a flood of fresh keys must not grow the process without limit)."""
    if len(entries) <= max_keys:
        return
    for k, (_, last) in list(entries.items()):
        if now - last >= idle:
            del entries[k]
    if len(entries) > max_keys:
        for k, _ in sorted(entries.items(), key=lambda kv: kv[1][1])[: len(entries) // 2]:
            del entries[k]


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

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.rate)

    def hit(self, key: str, cost: float = 1.0) -> Decision:
        """Take `cost` tokens from `key`'s bucket if it has them."""
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens >= cost:
            self._store(key, tokens - cost, now)
            return Decision(True)
        self._store(key, tokens, now)
        return Decision(False, (cost - tokens) / self.rate)

    def peek(self, key: str, cost: float = 1.0) -> Decision:
        """Whether `hit` would allow, taking nothing (a ceiling that only failures drain)."""
        tokens = self._tokens(key, self._clock())
        return Decision(True) if tokens >= cost else Decision(False, (cost - tokens) / self.rate)

    def allow(self, key: str) -> bool:
        return self.hit(key).allowed

    def reset(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        # Buckets that have refilled completely behave like new ones.
        prune(self._buckets, now, self.burst / self.rate, self._max_keys)


class Backoff:
    """Failures per key double a wait the caller must honour: after the n-th failure in a
    row the next attempt is allowed `base * 2**(n-1)` seconds later, at most `cap`.
    Attempts during the wait are refused without counting (a user retrying early does
    not make it worse); a success forgets the key, and so does a day without failures."""

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        forget_after: float = 86400.0,
        max_keys: int = 100_000,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("base must be > 0 and cap >= base")
        self.base = base
        self.cap = cap
        self._clock = clock
        self._forget_after = max(forget_after, cap)
        self._max_keys = max_keys
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (failures in a row, last failure)

    def _wait(self, count: int) -> float:
        return min(self.cap, self.base * 2.0 ** min(count - 1, 64))

    def check(self, key: str) -> Decision:
        """May `key` try now? If not, for how long it must still wait."""
        entry = self._failures.get(key)
        if entry is None:
            return Decision(True)
        left = entry[1] + self._wait(entry[0]) - self._clock()
        return Decision(True) if left <= 0 else Decision(False, left)

    def failed(self, key: str) -> Decision:
        """Count a failure; the wait it starts."""
        now = self._clock()
        count, last = self._failures.get(key, (0, now))
        count = 1 if now - last >= self._forget_after else count + 1
        self._failures[key] = (count, now)
        prune(self._failures, now, self._forget_after, self._max_keys)
        return Decision(False, self._wait(count))

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
