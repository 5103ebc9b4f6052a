"""The token-bucket rate limiter, the sign-in backoff and failure ceiling, the Prometheus
exposition, and registration throttling."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshmgmt.app import create_app
from meshmgmt.idp.signin import BACKOFF, CEILING, SignInThrottle
from meshmgmt.metrics import Registry
from meshmgmt.ratelimit import Backoff, Decision, RateLimiter
from meshmgmt.settings import MgmtSettings


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_burst_then_rate() -> None:
    clock = Clock()
    rl = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]
    d = rl.hit("a")
    assert not d.allowed and d.retry_after == pytest.approx(0.5) and d.retry_after_header == "1"
    assert rl.allow("b")  # keys are independent
    clock.t += 0.5
    assert rl.allow("a") and not rl.allow("a")
    clock.t += 100
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]  # refills to the burst only


def test_bucket_prunes_idle_keys() -> None:
    clock = Clock()
    rl = RateLimiter(rate=1.0, burst=1, clock=clock, max_keys=10)
    for i in range(10):
        rl.hit(str(i))
    clock.t += 5
    rl.hit("new")
    assert len(rl._buckets) == 1


def test_bad_limiter_settings() -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)


def test_backoff_doubles_up_to_the_cap_and_resets_on_success() -> None:
    clock = Clock()
    b = Backoff(base=1.0, cap=8.0, clock=clock)
    assert b.check("k").allowed
    waits = [b.failed("k").retry_after for _ in range(6)]
    assert waits == [1, 2, 4, 8, 8, 8]
    assert b.check("k").retry_after == pytest.approx(8)
    clock.t += 7.5
    assert not b.check("k").allowed  # early retries are refused, and do not count
    clock.t += 0.5
    assert b.check("k").allowed
    b.succeeded("k")
    assert b.failed("k").retry_after == 1


def test_backoff_forgets_after_a_quiet_day() -> None:
    clock = Clock()
    b = Backoff(base=1.0, cap=900.0, clock=clock)
    for _ in range(5):
        b.failed("k")
    clock.t += 86400
    assert b.failed("k").retry_after == 1


def _may_try(t: SignInThrottle, email: str, client: str) -> Decision:
    """One attempt's verdict, released at once (these tests look at waits, not overlap)."""
    decision = t.begin(email, client)
    t.release(email, client)
    return decision


def test_one_client_failing_does_not_slow_another() -> None:
    clock = Clock()
    t = SignInThrottle(backoff=(1.0, 900.0), ceiling=(1 / 60, 50), clock=clock)
    for _ in range(5):
        t.failed("alice@example.com", "198.51.100.66")
    d = _may_try(t, "Alice@example.com", "198.51.100.66")
    assert (d.allowed, d.reason) == (False, BACKOFF) and d.retry_after == pytest.approx(16)
    assert _may_try(t, "alice@example.com", "203.0.113.10").allowed  # the owner, elsewhere
    assert _may_try(t, "bob@example.com", "198.51.100.66").allowed  # another account, same client


def test_one_attempt_in_flight_per_email_and_client() -> None:
    t = SignInThrottle(clock=Clock())
    assert t.begin("alice@example.com", "192.0.2.1").allowed
    second = t.begin("alice@example.com", "192.0.2.1")
    assert (second.allowed, second.reason) == (False, BACKOFF)
    assert t.begin("alice@example.com", "192.0.2.2").allowed
    t.release("alice@example.com", "192.0.2.1")
    assert t.begin("alice@example.com", "192.0.2.1").allowed


def test_the_ceiling_spares_clients_that_signed_in_before() -> None:
    clock = Clock()
    t = SignInThrottle(backoff=(1.0, 900.0), ceiling=(1 / 60, 3), clock=clock)
    t.succeeded("alice@example.com", "203.0.113.10")  # her laptop, last week
    for i in range(3):  # failures spread over many addresses
        t.failed("alice@example.com", f"198.51.100.{i}")
    fresh = _may_try(t, "alice@example.com", "192.0.2.1")
    assert (fresh.allowed, fresh.reason) == (False, CEILING) and fresh.retry_after == pytest.approx(60)
    assert _may_try(t, "alice@example.com", "203.0.113.10").allowed
    assert _may_try(t, "bob@example.com", "192.0.2.1").allowed
    clock.t += 30 * 86400  # remembered for 30 days, then a stranger again
    for i in range(3):
        t.failed("alice@example.com", f"198.51.100.{i}")
    assert _may_try(t, "alice@example.com", "203.0.113.10").reason == CEILING


def test_exposition_format() -> None:
    reg = Registry()
    reg.counter("x_total", "things").inc(kind='a"b')
    reg.counter("x_total", "things").inc(2, kind='a"b')
    reg.gauge("g", "a gauge").set(3)
    h = reg.histogram("h_seconds", "durations")
    h.observe(0.003)
    h.observe(7)
    reg.callback_gauge("cb", "callback", lambda: 5)
    reg.add_text_source(lambda: "# TYPE other counter\nother 1")
    text = reg.render()
    assert '# TYPE x_total counter\nx_total{kind="a\\"b"} 3\n' in text
    assert "\ng 3\n" in text and "\ncb 5\n" in text
    assert 'h_seconds_bucket{le="0.005"} 1' in text and 'h_seconds_bucket{le="+Inf"} 2' in text
    assert "h_seconds_count 2" in text and text.endswith("other 1\n")


async def test_registration_is_rate_limited(tmp_path: Path) -> None:
    app = create_app(MgmtSettings(data_dir=tmp_path, register_rate=0.01, register_burst=3))
    async with TestClient(TestServer(app)) as client:
        statuses = []
        for _ in range(5):
            resp = await client.post("/api/peers/register", json={"setup_key": "nope"})
            statuses.append(resp.status)
            if resp.status == 429:
                assert int(resp.headers["Retry-After"]) >= 1
                assert (await resp.json())["error"] == "rate_limited"
        assert statuses == [400, 400, 400, 429, 429]
        metrics = await (await client.get("/metrics")).text()
        assert "meshmgmt_peers_connected 0" in metrics
