"""The token-bucket rate limiter, the Prometheus exposition, and registration throttling."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from management.app import create_app
from management.metrics import Registry
from management.ratelimit import RateLimiter
from management.settings import MgmtSettings


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
