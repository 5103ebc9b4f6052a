"""PermitListen parsing and the -R listen decision (meshsshd/permit_open.py, forwarding.may_listen)."""

from __future__ import annotations

import pytest

from meshsshd.config import settings_from_dict, settings_from_netmap
from meshsshd.forwarding import may_listen
from meshsshd.netmap import NetworkMap, PeerInfo, SSHSection
from meshsshd.permit_open import OpenTarget, PermitOpenError, may_listen_on, parse_permit_listen


@pytest.mark.parametrize("entries, host, port, allowed", [
    pytest.param((), "localhost", 8080, True, id="unset-means-any"),
    pytest.param(("any",), "localhost", 8080, True, id="any"),
    pytest.param(("none",), "localhost", 8080, False, id="none"),
    pytest.param(("8080",), "127.0.0.1", 8080, True, id="bare-port-any-host"),
    pytest.param(("8080",), "127.0.0.1", 8081, False, id="bare-port-other-port"),
    pytest.param(("localhost:8080",), "LOCALHOST", 8080, True, id="name-case-insensitive"),
    pytest.param(("localhost:8080",), "127.0.0.1", 8080, False, id="localhost-is-not-127.0.0.1"),
    pytest.param(("127.0.0.*:*",), "127.0.0.9", 1, True, id="wildcard-host-any-port"),
    pytest.param(("127.0.0.?:80",), "127.0.0.10", 80, False, id="question-mark-one-char"),
    pytest.param(("[::1]:22",), "0:0::1", 22, True, id="ipv6-by-value"),
    pytest.param(("localhost:8080",), "localhost", 0, False, id="dynamic-port-needs-star"),
    pytest.param(("localhost:*",), "localhost", 0, True, id="dynamic-port-star"),
])
def test_may_listen_on(entries, host, port, allowed):
    assert may_listen_on(entries, host, port).allowed is allowed


@pytest.mark.parametrize("entry", ["", "x", "0", "70000", "a b:1", "[127.0.0.1]:1", "host[1]:80", "db:x"])
def test_bad_entries_are_named(entry):
    with pytest.raises(PermitOpenError, match="permit_listen"):
        parse_permit_listen([entry])


def test_words_stand_alone():
    assert parse_permit_listen(["NONE"]) == ()
    assert parse_permit_listen(["any"]) is None
    assert parse_permit_listen(["8080"]) == (OpenTarget("*", 8080),)
    with pytest.raises(PermitOpenError, match="'none' cannot be combined"):
        parse_permit_listen(["none", "8080"])


def test_it_only_narrows_the_bind_rules():
    """`*:*` does not open all interfaces, nor a privileged port to a user."""
    wide = ("*:*",)
    assert not may_listen("0.0.0.0", 8080, uid=1000, own_addresses=(), permit_listen=wide).allowed
    assert not may_listen("10.0.0.1", 8080, uid=1000, own_addresses=(), permit_listen=wide).allowed
    assert not may_listen("localhost", 80, uid=1000, own_addresses=(), permit_listen=wide).allowed
    assert may_listen("100.64.0.1", 8080, uid=1000, own_addresses=("100.64.0.1",), permit_listen=wide).allowed
    refused = may_listen("localhost", 8080, uid=1000, own_addresses=(), permit_listen=("9000",))
    assert not refused.allowed and "permit_listen" in refused.reason


def test_the_map_sets_it_in_managed_mode():
    ssh = SSHSection(enabled=True, permit_listen=("localhost:8080",))
    netmap = NetworkMap(serial=1, peer=PeerInfo(id="p", name="p", fqdn="p.mesh", mesh_ip="100.64.0.1"),
                        network="100.64.0.0/10", ssh=ssh)
    base = settings_from_dict({"disable_auth": True})
    assert settings_from_netmap(base, netmap).permit_listen == ("localhost:8080",)
