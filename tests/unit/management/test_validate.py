"""The field rules the API handlers check and its OpenAPI document states (`api/_validate.py`).

The patterns are regexes standing in for parsers (base64 of an SSH key blob, IP
addresses, port numbers); these tests hold each one to the parser it replaces, both
ways: what the pattern admits parses, and what parses is admitted.
"""

from __future__ import annotations

import base64
import ipaddress
import re

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmgmt.api import _validate as v
from meshmgmt.api.subsystems import COMMAND, SUBSYSTEM_NAME
from meshmgmt.errors import BadRequest

SPECS = {name: spec for name, spec in vars(v).items() if isinstance(spec, v.Text)} | {
    "COMMAND": COMMAND, "SUBSYSTEM_NAME": SUBSYSTEM_NAME}


def _admits(spec: v.Text, value: str) -> bool:
    try:
        spec.check(value, "f")
    except BadRequest:
        return False
    return True


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_no_pattern_admits_a_nul(name: str, data: st.DataObject) -> None:
    value = data.draw(st.from_regex(re.compile(SPECS[name].pattern), fullmatch=True))
    assert "\x00" not in value


@pytest.mark.parametrize("alg", ["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                                 "ecdsa-sha2-nistp521", "ssh-rsa"])
def test_real_host_keys_are_admitted_without_their_comment(alg: str) -> None:
    line = asyncssh.generate_private_key(alg, comment="host@example").export_public_key().decode()
    assert _admits(v.SSH_PUBLIC_KEY, line)
    assert v.ssh_public_key(line) == " ".join(line.split()[:2])


@pytest.mark.parametrize("key_type", v.SSH_KEY_TYPES)
@pytest.mark.parametrize("extra", range(4), ids=lambda n: f"{n}-more-bytes")
def test_a_key_blob_must_begin_with_its_own_type(key_type: str, extra: int) -> None:
    blob = len(key_type).to_bytes(4, "big") + key_type.encode() + b"\xff" * extra
    data = base64.b64encode(blob).decode()
    assert _admits(v.SSH_PUBLIC_KEY, f"{key_type} {data}")
    other = "ssh-rsa" if key_type != "ssh-rsa" else "ssh-ed25519"
    assert not _admits(v.SSH_PUBLIC_KEY, f"{other} {data}")
    assert not _admits(v.SSH_PUBLIC_KEY, f"{key_type} {data[:-1]}")  # a cut is not base64


@settings(max_examples=100, deadline=None)
@given(st.from_regex(re.compile(v.SSH_PUBLIC_KEY.pattern), fullmatch=True))
def test_every_admitted_key_line_decodes_to_a_blob_of_its_type(line: str) -> None:
    if not line:
        return
    key_type, data = line.split()[:2]
    blob = base64.b64decode(data, validate=True)
    assert blob[:4 + len(key_type)] == len(key_type).to_bytes(4, "big") + key_type.encode()


@settings(max_examples=100, deadline=None)
@given(st.ip_addresses(), st.integers(1, 65535), st.booleans())
def test_every_address_and_port_is_an_endpoint(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
                                               exploded: bool) -> None:
    text = ip.exploded if exploded else ip.compressed
    assert _admits(v.ENDPOINT, f"[{text}]:{port}" if ip.version == 6 else f"{text}:{port}")


@settings(max_examples=100, deadline=None)
@given(st.from_regex(re.compile(v.ENDPOINT.pattern), fullmatch=True))
def test_every_admitted_endpoint_is_an_address_and_port(endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    assert 1 <= int(port) <= 65535


@pytest.mark.parametrize("endpoint", ["::1:51820", "[fe80::1%eth0]:1", "01.2.3.4:1", "1.2.3.4:0",
                                      "1.2.3.4:65536", "1.2.3.4", " 1.2.3.4:1", "[1.2.3.4]:1"])
def test_not_endpoints(endpoint: str) -> None:
    assert not _admits(v.ENDPOINT, endpoint)


def test_port_ranges_are_the_numbers_1_to_65535() -> None:
    ports = [str(p) for p in range(70000) if _admits(v.PORT_RANGE, str(p))]
    assert ports == [str(p) for p in range(1, 65536)]
    assert _admits(v.PORT_RANGE, "8000-8080") and _admits(v.PORT_RANGE, "80-22")  # order: the handler's 422
    assert not any(_admits(v.PORT_RANGE, p) for p in ("022", "+22", " 22", "22-", "-22", "1-2-3", "٢٢"))


@pytest.mark.parametrize(("spec", "good", "bad"), [
    pytest.param(v.PEER_NAME, ["web-1", "a", "0123456789abcdeg"], ["0123456789abcdef", "-a", "a-", "A", "a_b"],
                 id="peer-name"),
    pytest.param(v.LOGIN, ["*", "localpart", "alice", "Machine$", "_svc.x-1"], ["bad user", "1abc", "a$b", "é"],
                 id="login"),
    pytest.param(v.SOURCE, ["admins", "user:Bob@Example.com"], ["user:bob", "user: bob@x", "-x"], id="source"),
    pytest.param(v.EMAIL, ["a@b"], ["a b@c", "@b", "a@", "a@b@c", " a@b"], id="email"),
    pytest.param(COMMAND, ["pwsh -sshs", " x "], ["", "   ", "a\nb", "a\rb", "a\x00"], id="command"),
])
def test_patterns(spec: v.Text, good: list[str], bad: list[str]) -> None:
    assert [g for g in good if not _admits(spec, g)] == []
    assert [b for b in bad if _admits(spec, b)] == []
