"""Limits asyncssh does not have: MaxStartups, per-source penalties, auth tries.

Pure bookkeeping with the clock and the random source injected, so the policy is tested
without sockets. `server.py` calls it from the connection hooks and acts on the answers.

MaxStartups start:rate:full as in OpenSSH: below `start` unauthenticated connections
everything is admitted; from `start` a new connection is refused with probability
`rate`%, rising linearly to 100% at `full`. Plain OpenSSH then refuses *every* new
connection while a flood holds `full` sockets open, which locks real users out. Here a
connection that would be refused may instead take the place of the oldest unauthenticated
connection that has not even started user authentication after `stall_after` seconds
(a flood socket), so a real client, which reaches user authentication within
milliseconds, still gets in while idle floods only push each other out.
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
    opened: float
    progressed: bool = False


@dataclass(frozen=True)
class Admission:
    admitted: bool
    evict: Hashable | None = None   # an idle pre-auth connection to close to make room
    reason: str = ""


class StartupGate:
    """Tracks unauthenticated connections and decides who may start a new one."""

    def __init__(
        self,
        limits: Limits,
        *,
        stall_after: float = 1.0,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.stall_after = stall_after
        self._rng = rng
        self._clock = clock
        self._pending: dict[Hashable, _Pending] = {}

    @property
    def unauthenticated(self) -> int:
        return len(self._pending)

    def admit(self, key: Hashable) -> Admission:
        start, rate, full = self.limits.max_startups
        p = drop_probability(len(self._pending), start, rate, full)
        if p <= 0.0 or self._rng() >= p:
            self._pending[key] = _Pending(self._clock())
            return Admission(True)
        victim = self._oldest_stalled()
        if victim is not None:
            del self._pending[victim]
            self._pending[key] = _Pending(self._clock())
            return Admission(True, evict=victim, reason="max-startups-evict")
        return Admission(False, reason="max-startups")

    def progressed(self, key: Hashable) -> None:
        """The client reached user authentication: a real SSH client, not a stalled socket."""
        pending = self._pending.get(key)
        if pending is not None:
            pending.progressed = True

    def done(self, key: Hashable) -> None:
        """Authenticated or closed: no longer counts against MaxStartups."""
        self._pending.pop(key, None)

    def _oldest_stalled(self) -> Hashable | None:
        now = self._clock()
        for key, pending in self._pending.items():  # insertion order = age order
            if not pending.progressed and now - pending.opened >= self.stall_after:
                return key
        return None


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
