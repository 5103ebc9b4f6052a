"""Limits asyncssh does not have: MaxStartups, per-source penalties, auth tries.

Pure bookkeeping with the clock and the random source injected, so the policy is tested
without sockets. `connection.py` calls it from the connection hooks and acts on the answers.

MaxStartups start:rate:full as in OpenSSH: below `start` unauthenticated connections
everything is admitted; from `start` a new connection is refused with probability
`rate`%, rising linearly to 100% at `full`. Plain OpenSSH then refuses *every* new
connection while a flood holds `full` sockets open, which locks real users out. Here a
connection that would be refused instead takes the place of the *stalest*
unauthenticated connection: the one that has gone longest without progress (opened,
reached user authentication, made an attempt), wherever it stalls, preferring the
source that holds the most slots. A real client progresses every few milliseconds, so
stalled sockets, hello-only churn and clients parked at the password prompt push each
other out while it gets in. Only when every slot progressed within `stall_after`
seconds is the newcomer refused; a connection that never sent its identification string
yields after `silent_after` (a client sends it the moment TCP connects), so sockets that
reconnect the instant they are closed cannot keep every slot young. `per_source_max_startups` (OpenSSH's
PerSourceMaxStartups) caps the slots one address holds: its newcomers then replace its
own stalest connection, so a flood from one address cannot crowd out the others.
"""

from __future__ import annotations

import os
import random
import resource
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from .config import Limits


def drop_probability(unauthenticated: int, start: int, rate: int, full: int) -> float:
    """OpenSSH's MaxStartups curve, as a probability in [0, 1]."""
    if unauthenticated < start:
        return 0.0
    if unauthenticated >= full or full <= start:
        return 1.0
    pct = rate + (100 - rate) * (unauthenticated - start) / (full - start)
    return min(1.0, max(0.0, pct / 100.0))


@dataclass
class _Pending:
    source: str
    active: float   # the last sign of progress (opened, a new stage, an auth attempt)
    stage: int = 0


@dataclass(frozen=True)
class Admission:
    admitted: bool
    evict: Hashable | None = None   # a stalled pre-auth connection to close to make room
    reason: str = ""


class StartupGate:
    """Tracks unauthenticated connections and decides who may start a new one."""

    def __init__(
        self,
        limits: Limits,
        *,
        stall_after: float = 0.1,
        silent_after: float = 0.02,
        stage: Callable[[Hashable], int] = lambda key: 0,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.stall_after = stall_after
        self.silent_after = silent_after
        self._stage = stage
        self._rng = rng
        self._clock = clock
        self._pending: dict[Hashable, _Pending] = {}
        self._per_source: dict[str, int] = {}

    @property
    def unauthenticated(self) -> int:
        return len(self._pending)

    def admit(self, key: Hashable, source: str) -> Admission:
        cap = self.limits.per_source_max_startups
        if cap and self._per_source.get(source, 0) >= cap:
            return self._replace(key, source, only=source, reason="per-source-max-startups")
        start, rate, full = self.limits.max_startups
        p = drop_probability(len(self._pending), start, rate, full)
        if p <= 0.0 or self._rng() >= p:
            self._add(key, source)
            return Admission(True)
        return self._replace(key, source, only=None, reason="max-startups")

    def progressed(self, key: Hashable) -> None:
        """A step of a real login (user authentication began, an attempt came in)."""
        pending = self._pending.get(key)
        if pending is not None:
            pending.active = self._clock()

    def done(self, key: Hashable) -> None:
        """Authenticated or closed: no longer counts against MaxStartups."""
        pending = self._pending.pop(key, None)
        if pending is not None:
            left = self._per_source[pending.source] - 1
            if left:
                self._per_source[pending.source] = left
            else:
                del self._per_source[pending.source]

    def _add(self, key: Hashable, source: str) -> None:
        self._pending[key] = _Pending(source, self._clock())
        self._per_source[source] = self._per_source.get(source, 0) + 1

    def _replace(self, key: Hashable, source: str, *, only: str | None, reason: str) -> Admission:
        victim = self._stalest(source, only)
        if victim is None:
            return Admission(False, reason=reason)
        self.done(victim)
        self._add(key, source)
        return Admission(True, evict=victim, reason=f"{reason}-evict")

    def _stalest(self, newcomer: str, only: str | None) -> Hashable | None:
        """The victim: from the source holding the most slots (a flood loses its own
        sockets first), the least advanced (`stage`: silent, identified, key exchange
        done), then the one longest without progress. A source holding more slots
        than the newcomer's yields one at once; otherwise (the newcomer's own source) only
        a connection stalled for `stall_after`, so a login in progress is not cut off by
        the next connection from its own address. A silent one (stage 0) is stalled
        after `silent_after` already."""
        now = self._clock()
        stalled_before = now - self.stall_after
        silent_before = now - self.silent_after
        mine = self._per_source.get(newcomer, 0) + 1
        best: tuple[int, int, float] | None = None
        victim: Hashable | None = None
        for key, pending in self._pending.items():
            held = self._per_source[pending.source]
            if only is not None and pending.source != only:
                continue
            stage = self._stage(key)
            if stage > pending.stage:   # sampled here: progress only matters when choosing
                pending.stage, pending.active = stage, now
            if held <= mine and pending.active > (silent_before if pending.stage == 0 else stalled_before):
                continue
            rank = (-held, pending.stage, pending.active)
            if best is None or rank < best:
                best, victim = rank, key
        return victim


@dataclass
class _SourceRecord:
    failures: int = 0
    blocked_until: float = 0.0
    last: float = 0.0


@dataclass
class Penalties:
    """OpenSSH PerSourcePenalties, simplified: after `penalty_failures` failed
    authentications from one address, new connections from it are refused for
    `penalty_seconds`. Failures older than ten penalty periods are forgotten."""

    limits: Limits
    clock: Callable[[], float] = time.monotonic
    _sources: dict[str, _SourceRecord] = field(default_factory=dict)

    def blocked_for(self, source: str) -> float:
        rec = self._sources.get(source)
        if rec is None:
            return 0.0
        return max(0.0, rec.blocked_until - self.clock())

    def record_failure(self, source: str) -> bool:
        """Count one failed authentication; True when this starts a penalty."""
        now = self.clock()
        rec = self._sources.setdefault(source, _SourceRecord())
        if now - rec.last > 10 * self.limits.penalty_seconds:
            rec.failures = 0
        rec.last = now
        rec.failures += 1
        if self.limits.penalty_failures > 0 and rec.failures >= self.limits.penalty_failures:
            rec.failures = 0
            rec.blocked_until = now + self.limits.penalty_seconds
            return True
        return False

    def prune(self) -> None:
        now = self.clock()
        stale = [s for s, r in self._sources.items()
                 if r.blocked_until < now and now - r.last > 10 * self.limits.penalty_seconds]
        for s in stale:
            del self._sources[s]


@dataclass
class AuthTries:
    """MaxAuthTries for one connection: failures counted, the last one disconnects."""

    limit: int
    failures: int = 0

    def fail(self) -> bool:
        """Count a failure; True when the connection must now be closed."""
        self.failures += 1
        return self.failures >= self.limit


# File descriptors kept free for what is already running (sessions, forwards, the
# management link): below this many, new connections are refused.
FD_RESERVE = 64


def fds_free() -> int:
    """How many more fds this process may open (soft RLIMIT_NOFILE minus those open).
    Refusing connections before the limit keeps live sessions working and the daemon
    out of a crash loop when a user exhausts fds."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return soft - len(os.listdir("/proc/self/fd"))
