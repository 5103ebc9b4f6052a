"""SSH tokens for a `meshssh exec` run (client/fanout.py): every peer's token from as few
token-exchange requests as management allows, handed out once each, renewed in one request
for the peers not yet started when the first ones run low. Apart from the fan-out because
it is the part that talks to management, and is tested with a fake fetch and clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import AccessDenied, ClientError

if TYPE_CHECKING:
    from .auth import ExchangeResult

MAX_AUDIENCES = 512  # management's limit per token-exchange request (management/idp/issuer.py)
TOKEN_MARGIN = 20.0  # never dial with a token that has less life left than this


class TokenPool:
    """SSH tokens for the run, fetched in as few exchange requests as possible.

    `fetch` is `Session.ssh_tokens` (blocking HTTP; run in a thread). Each token is used
    once (peers refuse a replayed `jti`), so the pool hands a token out and forgets it.
    """

    def __init__(self, fetch: Callable[[list[tuple[str, str]]], dict[str, ExchangeResult]],
                 clock: Callable[[], float] = time.time) -> None:
        self._fetch = fetch
        self._clock = clock
        import asyncio

        self._results: dict[str, ExchangeResult] = {}
        self._pending: dict[str, str] = {}  # key → display name, not yet handed out
        self._lock = asyncio.Lock()
        self.requests = 0

    async def prime(self, targets: Sequence[tuple[str, str]]) -> None:
        self._pending = dict(targets)
        await self._refill(list(self._pending.items()))

    async def _refill(self, wanted: list[tuple[str, str]]) -> None:
        for i in range(0, len(wanted), MAX_AUDIENCES):
            self._results.update(await self._fetch_chunk(wanted[i:i + MAX_AUDIENCES]))

    async def _fetch_chunk(self, chunk: list[tuple[str, str]]) -> dict[str, ExchangeResult]:
        """One request; a management with a lower audience limit refuses the whole
        request (`invalid_request`, "at most N audiences"): ask again in halves."""
        import asyncio

        self.requests += 1
        got = await asyncio.to_thread(self._fetch, chunk)
        if len(chunk) > 1 and got and all(
                r.error_code == "invalid_request" and "audiences" in r.error for r in got.values()):
            half = len(chunk) // 2
            return {**await self._fetch_chunk(chunk[:half]), **await self._fetch_chunk(chunk[half:])}
        return got

    def refusal(self, key: str) -> str | None:
        res = self._results.get(key)
        return res.error if res is not None and res.error else None

    async def take(self, key: str) -> ExchangeResult:
        """A token with at least TOKEN_MARGIN seconds of life for this peer."""
        async with self._lock:
            res = self._results.get(key)
            if res is not None and not res.error and res.exp - self._clock() < TOKEN_MARGIN:
                # Tokens from the first request are running out: renew every peer that
                # has not started yet, in one request, not one per peer.
                stale = [(k, n) for k, n in self._pending.items()
                         if k in self._results and not self._results[k].error]
                await self._refill(stale)
                res = self._results.get(key)
            self._pending.pop(key, None)
            self._results.pop(key, None)
        if res is None:
            raise ClientError("management returned no SSH token")
        if res.error:
            raise AccessDenied(res.error)
        return res


class PoolSession:
    """What `connect.dial` needs from a session, backed by the pool: no cache to retry
    from (every token is fresh) and nothing to consume."""

    def __init__(self, pool: TokenPool, key: str) -> None:
        self.pool = pool
        self.key = key

    def ssh_token(self, peer_id: str, name: str, no_cache: bool = False) -> ExchangeResult:
        raise AccessDenied(f"{name}: the peer refused a fresh SSH token")

    def consume(self, peer_id: str, token: str) -> None:
        return None
