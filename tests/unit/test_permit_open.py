"""PermitOpen parsing and the -L/-D destination decision (meshsshd/permit_open.py); the
config and map fields of both lists (PermitListen's own cases: test_permit_listen.py)."""

from __future__ import annotations

import re

import pytest

from meshsshd.config import settings_from_dict
from meshsshd.errors import ConfigError
from meshsshd.mgmt_client import management_destinations
from meshsshd.netmap import NetmapError, SSHSection
from meshsshd.permit_open import OpenTarget, PermitOpenError, may_open, parse_permit_open

MGMT = ("10.0.0.5:443", "[fd00::5]:443")


@pytest.mark.parametrize("entries, name, address, port, allowed", [
    pytest.param((), "db", "10.1.2.3", 5432, True, id="unset-means-any"),
    pytest.param(("any",), "db", "10.1.2.3", 5432, True, id="any"),
    pytest.param(("none",), "db", "10.1.2.3", 5432, False, id="none"),
    pytest.param(("db:5432",), "DB.", "10.1.2.3", 5432, True, id="by-requested-name"),
    pytest.param(("db:5432",), "db", "10.1.2.3", 5433, False, id="wrong-port"),
    pytest.param(("10.1.2.3:*",), "db", "10.1.2.3", 1, True, id="by-resolved-address-any-port"),
    pytest.param(("*:443",), "web", "10.9.9.9", 443, True, id="any-host"),
    pytest.param(("[::1]:22",), "localhost", "::1", 22, True, id="ipv6"),
    pytest.param(("127.0.0.1:22",), "x", "::ffff:127.0.0.1", 22, True, id="v4-mapped"),
    pytest.param((), "x", "169.254.169.254", 80, False, id="metadata-refused-by-default"),
    pytest.param(("*:80",), "x", "169.254.169.254", 80, False, id="wildcard-does-not-lift-link-local"),
    pytest.param(("169.254.169.254:80",), "x", "169.254.169.254", 80, True, id="explicit-lifts-link-local"),
    pytest.param(("metadata:80",), "metadata", "169.254.169.254", 80, True, id="explicit-name-lifts-link-local"),
    pytest.param((), "x", "fe80::1%eth0", 22, False, id="ipv6-link-local"),
    pytest.param((), "mgmt", "10.0.0.5", 443, False, id="management-refused"),
    pytest.param((), "mgmt", "10.0.0.5", 444, True, id="management-other-port"),
    pytest.param(("10.0.0.5:443",), "mgmt", "10.0.0.5", 443, True, id="management-listed"),
    pytest.param((), "x", "0.0.0.0", 443, True, id="unspecified-is-loopback-not-management"),
])
def test_may_open(entries, name, address, port, allowed):
    assert may_open(entries, name, address, port, protected=MGMT).allowed is allowed


def test_unspecified_address_counts_as_loopback():
    """connect(0.0.0.0) reaches this host: a management server on loopback stays fenced."""
    assert not may_open((), "x", "0.0.0.0", 8080, protected=("127.0.0.1:8080",)).allowed
    assert not may_open((), "x", "::", 8080, protected=("[::1]:8080",)).allowed


def test_refusal_says_why():
    assert "permit_open" in may_open(("db:5432",), "web", "10.0.0.1", 80).reason
    assert "link-local" in may_open((), "x", "169.254.1.1", 80).reason


@pytest.mark.parametrize("entry", ["db", "[10.0.0.1]:22", "db:0", "db:70000", "a b:1", "::1:22", "db:x", "[::1]22"])
def test_bad_entries_are_named(entry):
    with pytest.raises(PermitOpenError, match="permit_open"):
        parse_permit_open([entry])


def test_words_stand_alone():
    assert parse_permit_open(["none"]) == ()
    assert parse_permit_open(["ANY"]) is None
    assert parse_permit_open(["*:*"]) == (OpenTarget("*", None),)
    for mixed in (["none", "db:1"], ["any", "db:1"]):
        with pytest.raises(PermitOpenError):
            parse_permit_open(mixed)


PERMIT_LISTS = [
    pytest.param("permit_open", ["db:5432", "[::1]:*"], "db", "host:port entries", id="permit_open"),
    pytest.param("permit_listen", ["8080", "[::1]:*"], "x:y", "[host:]port entries", id="permit_listen"),
]


@pytest.mark.parametrize("key, good, bad, syntax", PERMIT_LISTS)
def test_config_key_is_validated(key, good, bad, syntax):
    base = {"disable_auth": True}
    assert getattr(settings_from_dict({**base, key: good}), key) == tuple(good)
    assert getattr(settings_from_dict({**base, key: "none"}), key) == ("none",)
    assert getattr(settings_from_dict(base), key) == ()
    with pytest.raises(ConfigError, match=f"{key} entry '{bad}'"):
        settings_from_dict({**base, key: [bad]})
    with pytest.raises(ConfigError, match=re.escape(f"key `{key}[0]`: expected `str`, got `int`")):
        settings_from_dict({**base, key: [5432]})


@pytest.mark.parametrize("key, good, bad, syntax", PERMIT_LISTS)
def test_network_map_carries_the_list(key, good, bad, syntax):
    ssh = SSHSection(enabled=True, **{key: tuple(good)})
    assert SSHSection.from_dict(ssh.to_dict()) == ssh
    assert key not in SSHSection(enabled=True).to_dict()   # unchanged wire form when unset
    with pytest.raises(NetmapError, match=key):
        SSHSection.from_dict({key: [bad]})


def test_management_destinations():
    assert management_destinations("https://10.0.0.5/") == ("10.0.0.5:443",)
    assert management_destinations("http://[fd00::5]:8080") == ("[fd00::5]:8080",)
    assert "127.0.0.1:9000" in management_destinations("http://localhost:9000")
    assert management_destinations("http://no-such-host.invalid:1") == ()
