"""meshsshd.asyncssh_sigalgs: which signature names are refused (when the patch refuses
to apply: test_asyncssh_kexguess.py::test_refusal). Logins over the wire:
tests/integration/test_server_compat.py."""

from __future__ import annotations

import pytest
from asyncssh.packet import String

from meshsshd import asyncssh_sigalgs


@pytest.mark.parametrize("blob, name", [
    pytest.param(String(b"ssh-rsa") + String(b"sig"), b"ssh-rsa", id="sha1-rsa"),
    pytest.param(String(b"rsa-sha2-512") + String(b"sig"), b"rsa-sha2-512", id="sha2-rsa"),
    pytest.param(b"\x00\x00", None, id="truncated"),
])
def test_signature_algorithm(blob, name):
    assert asyncssh_sigalgs.signature_algorithm(blob) == name


def test_allowlist_has_no_sha1_signature():
    assert {b"ssh-rsa", b"ssh-dss"}.isdisjoint(asyncssh_sigalgs.ALLOWED)
    assert {b"rsa-sha2-256", b"rsa-sha2-512", b"ssh-ed25519"} <= asyncssh_sigalgs.ALLOWED
