"""Sign-in and registration throttling against a real `meshmgmt serve` (issue 11, item 7).

A guesser must not be able to lock a chosen user out, and behind a reverse proxy clients
must not share one bucket. Distinct clients are distinct loopback source addresses
(127.0.0.2, 127.0.0.3, …) or, behind the "proxy" (the test itself, trusted with
`--trusted-proxy 127.0.0.1`), distinct X-Forwarded-For addresses.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshsshd.peerproof import public_key_b64
from tests.support import console_script

from .mgmtkit import Mgmt, call, host_key, init_data_dir, mgmt_server

PASSWORD = "alice-has-a-long-password"
ALICE = "alice@example.com"


class _Form(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "input" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")


def _serve(tmp: Path, *flags: str) -> Iterator[Mgmt]:
    with mgmt_server(tmp, extra=("--register-burst", "2", "--register-rate", "0.01", *flags)) as mgmt:
        asyncio.run(_create_alice(mgmt))
        yield mgmt


async def _create_alice(mgmt: Mgmt) -> None:
    async with aiohttp.ClientSession() as http:
        await call(http, "POST", mgmt.url + "/api/users", headers=mgmt.admin, expect=201,
                   json={"email": ALICE, "name": "Alice", "password": PASSWORD})


@pytest.fixture
def direct(tmp_path: Path) -> Iterator[Mgmt]:
    """No trusted proxy: the TCP peer is the client, X-Forwarded-For is ignored."""
    yield from _serve(tmp_path)


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Mgmt]:
    """Behind a reverse proxy at 127.0.0.1 (this test plays it)."""
    yield from _serve(tmp_path, "--trusted-proxy", "127.0.0.1")


class Browser:
    """One client: its own source address (or forwarded address) and cookie jar."""

    def __init__(self, mgmt: Mgmt, source: str = "127.0.0.1", forwarded_for: str | None = None) -> None:
        self.mgmt = mgmt
        self.headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
        self.http = aiohttp.ClientSession(mgmt.url, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                          connector=aiohttp.TCPConnector(local_addr=(source, 0)),
                                          timeout=aiohttp.ClientTimeout(total=30))

    async def user_code(self) -> str:
        async with self.http.post("/oauth/device/code", data={"client_id": "meshssh"}, headers=self.headers) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["user_code"]

    async def sign_in(self, password: str, user_code: str = "BCDF-GHJK", email: str = ALICE
                      ) -> tuple[int, int | None, str]:
        """(status, Retry-After, page) of one approval on the verification page."""
        async with self.http.get("/device", params={"user_code": user_code}, headers=self.headers) as page:
            form = _Form()
            form.feed(await page.text())
        fields = dict(form.fields, email=email, password=password, action="approve")
        async with self.http.post("/device", data=fields, headers=self.headers) as done:
            retry = done.headers.get("Retry-After")
            return done.status, int(retry) if retry else None, await done.text()


@pytest.fixture
async def browsers() -> AsyncIterator[list[Browser]]:
    made: list[Browser] = []
    yield made
    for b in made:
        await b.http.close()


async def test_a_guesser_cannot_lock_the_owner_out(direct: Mgmt, browsers: list[Browser]) -> None:
    guesser, owner = Browser(direct, "127.0.0.2"), Browser(direct, "127.0.0.3")
    browsers += [guesser, owner]
    statuses = [(await guesser.sign_in("guess"))[0] for _ in range(8)]
    assert statuses[0] == 401 and 429 in statuses  # told to wait after a failure
    status, _, page = await owner.sign_in(PASSWORD, await owner.user_code())
    assert status == 200 and "Device approved" in page, page


async def test_failures_double_a_wait_the_client_must_honour(direct: Mgmt, browsers: list[Browser]) -> None:
    client = Browser(direct, "127.0.0.4")
    browsers.append(client)
    assert (await client.sign_in("guess"))[:2] == (401, 1)
    status, retry, page = await client.sign_in("guess")
    assert (status, retry) == (429, 1) and "Too many failed sign-ins for this email from here" in page
    assert (await client.sign_in(PASSWORD))[0] == 429  # not even the right password during the wait
    await asyncio.sleep(1.1)
    assert (await client.sign_in("guess"))[:2] == (401, 2)
    await asyncio.sleep(1.1)
    assert (await client.sign_in("guess"))[:2] == (429, 1)  # early: refused, and the wait is not extended
    await asyncio.sleep(1.1)
    assert (await client.sign_in("guess"))[:2] == (401, 4)
    await asyncio.sleep(4.1)
    status, _, page = await client.sign_in(PASSWORD, await client.user_code())
    assert status == 200 and "Device approved" in page
    assert (await client.sign_in("guess"))[:2] == (401, 1)  # a success started it over


async def test_parallel_guesses_do_not_slip_past_the_wait(direct: Mgmt, browsers: list[Browser]) -> None:
    """Checking a password takes a while; guesses sent together must not all be checked
    before the first failure starts the wait."""
    guesser = Browser(direct, "127.0.0.6")
    browsers.append(guesser)
    results = await asyncio.gather(*(guesser.sign_in(f"guess-{i}") for i in range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [401] + [429] * 7, statuses


async def test_forwarded_for_is_ignored_without_a_trusted_proxy(direct: Mgmt, browsers: list[Browser]) -> None:
    """A client cannot pick a fresh address by sending the header itself."""
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            status, _ = await _register(http, direct, f"203.0.113.{i}")
    assert status == 429
    attacker = Browser(direct, "127.0.0.5", forwarded_for="203.0.113.50")
    browsers.append(attacker)
    await attacker.sign_in("guess")
    attacker.headers["X-Forwarded-For"] = "203.0.113.51"
    assert (await attacker.sign_in("guess"))[0] == 429


async def _register(http: aiohttp.ClientSession, mgmt: Mgmt, forwarded_for: str) -> tuple[int, object]:
    body = {"setup_key": "mk_not-a-key", "wg_public_key": public_key_b64(X25519PrivateKey.generate()), "ssh_host_key": host_key(),
            "hostname": "x", "flags": {}, "version": "test", "endpoints": []}
    return await call(http, "POST", mgmt.url + "/api/peers/register", json=body,
                      headers={"X-Forwarded-For": forwarded_for})


async def test_clients_behind_a_trusted_proxy_are_told_apart(proxied: Mgmt, browsers: list[Browser]) -> None:
    guesser = Browser(proxied, forwarded_for="203.0.113.5")
    owner = Browser(proxied, forwarded_for="198.51.100.23")
    browsers += [guesser, owner]
    assert (await guesser.sign_in("guess"))[0] == 401
    assert (await guesser.sign_in("guess"))[0] == 429
    status, _, page = await owner.sign_in(PASSWORD, await owner.user_code())
    assert status == 200 and "Device approved" in page, page  # same proxy, another client

    async with aiohttp.ClientSession() as http:
        assert [(await _register(http, proxied, "203.0.113.5"))[0] for _ in range(3)][2] == 429
        assert (await _register(http, proxied, "198.51.100.23"))[0] != 429
        # Prepending an address does not help: the right-most untrusted one counts.
        assert (await _register(http, proxied, "192.0.2.99, 203.0.113.5"))[0] == 429
        # WebSockets work through the rewritten request too (the admin's event stream).
        async with http.ws_connect(proxied.url + "/api/events/stream",
                                   headers={**proxied.admin, "X-Forwarded-For": "198.51.100.23"}) as ws:
            await call(http, "POST", proxied.url + "/api/users", headers=proxied.admin, expect=201,
                       json={"email": "bob@example.com", "name": "Bob"})
            msg = await ws.receive_json(timeout=10)
        assert (msg["type"], msg["event"]["type"]) == ("event", "user.created")
    log = proxied.proc.output()
    assert '"ip":"203.0.113.5"' in log and '"reason":"signin-backoff"' in log


def test_serve_refuses_a_proxy_that_trusts_everyone(tmp_path: Path) -> None:
    data_dir = tmp_path / "mgmt"
    init_data_dir(data_dir)
    res = subprocess.run([console_script("meshmgmt"), "serve", "--data-dir", str(data_dir), "--listen",
                          "127.0.0.1:0", "--trusted-proxy", "0.0.0.0/0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "--trusted-proxy '0.0.0.0/0' trusts every address" in res.stderr
