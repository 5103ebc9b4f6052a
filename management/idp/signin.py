"""How often a password may be tried for one account, without letting anyone lock the
account's owner out.

A shared per-email bucket was a lockout switch: one wrong password every half minute
from anywhere kept the real user from signing in anywhere. Instead:

- **Per (email, client)** — `Backoff`: each failure doubles the wait before that client
  may try that email again (1 s, 2 s, 4 s … 15 min); a success resets it. A guesser at
  one address gets about a dozen tries in the first hour, then 4 an hour; the owner at
  another address is not affected at all. One attempt per pair is checked at a time.
- **Per email, failures only** — a ceiling (token bucket drained by failures, not by
  attempts) against guessing spread over many addresses. When it is empty, clients that
  have never signed in as this email must wait; clients that have (within `remember`,
  30 days) are exempt, so the owner's usual devices keep working during an attack.
  The price: during a large distributed attack the owner on a new network waits for
  the ceiling, like everyone else.

A client is an address (`request.remote`, behind trusted proxies the forwarded one): people
behind one NAT share it. The clock is injectable for tests; state is per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from meshmgmt.ratelimit import Backoff, Decision, RateLimiter, prune

BACKOFF = "signin-backoff"
CEILING = "signin-ceiling"


class SignInThrottle:
    def __init__(
        self,
        backoff: tuple[float, float] = (1.0, 900.0),
        ceiling: tuple[float, int] = (1 / 60, 50),
        remember: float = 30 * 86400.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self._backoff = Backoff(*backoff, clock=clock, max_keys=max_keys)
        self._ceiling = RateLimiter(*ceiling, clock=clock, max_keys=max_keys)
        self._remember = remember
        self._clock = clock
        self._max_keys = max_keys
        self._known: dict[str, tuple[None, float]] = {}  # email + client -> (None, last success)
        self._in_flight: set[str] = set()

    @staticmethod
    def _pair(email: str, client: str) -> str:
        return f"{email.lower()}\n{client}"

    def _is_known(self, pair: str) -> bool:
        seen = self._known.get(pair)
        return seen is not None and self._clock() - seen[1] < self._remember

    def begin(self, email: str, client: str) -> Decision:
        """Before the password is looked at: may this client try this email now? If so,
        the attempt is in flight until `release`: checking a password takes a while
        (argon2 in the executor), and parallel attempts would all pass the wait that
        the first failure is about to start."""
        pair = self._pair(email, client)
        if pair in self._in_flight:
            return Decision(False, 1.0, BACKOFF)
        waiting = self._backoff.check(pair)
        if not waiting.allowed:
            return Decision(False, waiting.retry_after, BACKOFF)
        if not self._is_known(pair):
            ceiling = self._ceiling.peek(email.lower())
            if not ceiling.allowed:
                return Decision(False, ceiling.retry_after, CEILING)
        self._in_flight.add(pair)
        return Decision(True)

    def release(self, email: str, client: str) -> None:
        """The attempt `begin` allowed is over (whatever its outcome)."""
        self._in_flight.discard(self._pair(email, client))

    def failed(self, email: str, client: str) -> Decision:
        """A wrong password: the wait it starts for this client."""
        self._ceiling.hit(email.lower())
        return self._backoff.failed(self._pair(email, client))

    def succeeded(self, email: str, client: str) -> None:
        """The password was right: this client starts over and is remembered."""
        pair = self._pair(email, client)
        self._backoff.succeeded(pair)
        now = self._clock()
        self._known[pair] = (None, now)
        prune(self._known, now, self._remember, self._max_keys)


__all__ = ["BACKOFF", "CEILING", "SignInThrottle"]
