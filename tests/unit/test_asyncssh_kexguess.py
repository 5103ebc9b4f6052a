"""meshsshd.asyncssh_kexguess: the RFC 4253 §7 verdict on a guessed first KEX packet, and
when it and asyncssh_sigalgs refuse to patch. dropbear's client over the wire:
tests/integration/test_server_compat.py."""

from __future__ import annotations

import pytest
from asyncssh import connection as conn_mod
from asyncssh.packet import Boolean, Byte, NameList, UInt32

from meshsshd import asyncssh_kexguess, asyncssh_sigalgs


def _kexinit(kex: list[bytes], host_keys: list[bytes], follows: bool) -> bytes:
    lists = [kex, host_keys] + [[b"aes128-ctr"]] * 2 + [[b"hmac-sha2-256"]] * 2 + [[b"none"]] * 2 + [[]] * 2
    return b"".join((Byte(conn_mod.MSG_KEXINIT), bytes(16), *(NameList(x) for x in lists), Boolean(follows), UInt32(0)))


SERVER = _kexinit([b"mlkem768x25519-sha256", b"curve25519-sha256"], [b"ssh-ed25519", b"rsa-sha2-512"], False)


@pytest.mark.parametrize("kex, host_keys, follows, wrong", [
    # asyncssh called this one right (curve25519 is negotiated and is dropbear's first).
    pytest.param([b"curve25519-sha256", b"mlkem768x25519-sha256"], [b"ssh-ed25519"], True, True, id="dropbear"),
    pytest.param([b"mlkem768x25519-sha256"], [b"ssh-ed25519"], True, False, id="same-preferences"),
    pytest.param([b"mlkem768x25519-sha256"], [b"rsa-sha2-512", b"ssh-ed25519"], True, True, id="other-host-key"),
    pytest.param([b"curve25519-sha256"], [b"ssh-ed25519"], False, False, id="no-guess"),
])
def test_guess_verdict(kex, host_keys, follows, wrong):
    assert asyncssh_kexguess.guess_is_wrong(_kexinit(kex, host_keys, follows), SERVER) is wrong


class _OtherKexinit(conn_mod.SSHServerConnection):
    _packet_handlers = {**conn_mod.SSHConnection._packet_handlers, conn_mod.MSG_KEXINIT: lambda *a: None}


class _OtherValidate(conn_mod.SSHServerConnection):
    async def validate_public_key(self, username, key_data, msg, signature):  # checks elsewhere
        return False


@pytest.mark.parametrize("module, version, cls, reason", [
    pytest.param(asyncssh_kexguess, "2.24.1", None, None, id="kexguess-checked-version"),
    pytest.param(asyncssh_kexguess, "2.25.0", None, "version-not-checked", id="kexguess-next-minor"),
    pytest.param(asyncssh_kexguess, "2.24.1", _OtherKexinit, "kexinit-changed", id="kexguess-handler-rewritten"),
    pytest.param(asyncssh_sigalgs, "2.24.1", None, None, id="sigalgs-checked-version"),
    pytest.param(asyncssh_sigalgs, "2.25.0", None, "version-not-checked", id="sigalgs-next-minor"),
    pytest.param(asyncssh_sigalgs, "2.24.1", _OtherValidate, "validate-public-key-changed", id="sigalgs-rewritten"),
])
def test_refusal(module, version, cls, reason):
    """Both patches (this module's and asyncssh_sigalgs) refuse what they were not read against."""
    assert module.refusal(version, cls or conn_mod.SSHServerConnection) == reason
