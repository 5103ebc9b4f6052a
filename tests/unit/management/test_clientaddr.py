"""Which address a request comes from, with and without trusted reverse proxies."""

from __future__ import annotations

import pytest

from meshmgmt.clientaddr import client_address, parse_trusted_proxies
from meshmgmt.errors import BadRequest

PROXIES = parse_trusted_proxies(["10.0.0.0/8", "2001:db8::/32"])


@pytest.mark.parametrize(("remote", "xff", "proxies", "want"), [
    pytest.param("198.51.100.7", ["203.0.113.5"], (), "198.51.100.7", id="no-trusted-proxies-header-ignored"),
    pytest.param("198.51.100.7", ["203.0.113.5"], PROXIES, "198.51.100.7", id="untrusted-peer-header-ignored"),
    pytest.param("10.0.0.2", ["203.0.113.5"], PROXIES, "203.0.113.5", id="one-proxy"),
    pytest.param("10.0.0.2", [], PROXIES, "10.0.0.2", id="proxy-without-header"),
    pytest.param("10.0.0.2", ["1.1.1.1, 203.0.113.5"], PROXIES, "203.0.113.5", id="spoofed-left-entry-not-used"),
    pytest.param("10.0.0.2", ["1.1.1.1, 203.0.113.5, 10.0.0.9"], PROXIES, "203.0.113.5", id="two-proxies"),
    pytest.param("10.0.0.2", ["1.1.1.1", "203.0.113.5"], PROXIES, "203.0.113.5", id="two-headers-in-order"),
    pytest.param("10.0.0.2", ["10.0.0.5, 10.0.0.9"], PROXIES, "10.0.0.5", id="all-trusted-left-most"),
    pytest.param("10.0.0.2", ["203.0.113.5, garbage"], PROXIES, "10.0.0.2", id="garbage-stops-at-last-known"),
    pytest.param("10.0.0.2", ["[2001:db9::1]:4711"], PROXIES, "2001:db9::1", id="bracketed-v6-with-port"),
    pytest.param("10.0.0.2", ["203.0.113.5:4711"], PROXIES, "203.0.113.5", id="v4-with-port"),
    pytest.param("2001:db8::1", ["2001:db9::7"], PROXIES, "2001:db9::7", id="v6-proxy"),
    pytest.param("::ffff:10.0.0.2", ["203.0.113.5"], PROXIES, "203.0.113.5", id="v4-mapped-proxy"),
    pytest.param(None, ["203.0.113.5"], PROXIES, "?", id="no-peer-address"),
])
def test_client_address(remote: str | None, xff: list[str], proxies: tuple, want: str) -> None:
    assert client_address(remote, xff, proxies) == want


@pytest.mark.parametrize(("spec", "message"), [
    pytest.param("10.0.0.1/8", "is not an address or CIDR network", id="host-bits"),
    pytest.param("proxy.example", "is not an address or CIDR network", id="name"),
    pytest.param("0.0.0.0/0", "trusts every address", id="everything-v4"),
    pytest.param("::/0", "trusts every address", id="everything-v6"),
])
def test_bad_trusted_proxies_are_refused_with_a_reason(spec: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_trusted_proxies([spec])


def test_a_single_address_is_a_host_network() -> None:
    assert [str(n) for n in parse_trusted_proxies(["127.0.0.1", " ::1 "])] == ["127.0.0.1/32", "::1/128"]
