"""meshsshd.handshake.unmatched: which KEXINIT lists have nothing in common. Logging a
failed handshake over the wire: tests/integration/test_server_compat.py."""

from __future__ import annotations

import pytest
from asyncssh import connection as conn_mod
from asyncssh.packet import Boolean, Byte, NameList, UInt32

from meshsshd import algorithms, handshake


def _kexinit(kex=(b"curve25519-sha256",), host_key=(b"ssh-ed25519",), cipher=(b"aes128-ctr",),
             mac=(b"hmac-sha2-256-etm@openssh.com",), compression=(b"none",)) -> bytes:
    lists = [kex, host_key, cipher, cipher, mac, mac, compression, compression, (), ()]
    return b"".join((Byte(conn_mod.MSG_KEXINIT), bytes(16), *(NameList(list(x)) for x in lists),
                     Boolean(False), UInt32(0)))


SERVER = _kexinit(kex=[a.encode() for a in algorithms.KEX_ALGS],
                  cipher=[a.encode() for a in algorithms.ENCRYPTION_ALGS],
                  mac=[a.encode() for a in algorithms.MAC_ALGS])


@pytest.mark.parametrize("client, missing", [
    pytest.param(_kexinit(), {}, id="all-common"),
    pytest.param(_kexinit(kex=[b"diffie-hellman-group14-sha1"]), {"kex": "diffie-hellman-group14-sha1"}, id="kex"),
    # libssh2 1.10: CTR needs a MAC and it knows no -etm one.
    pytest.param(_kexinit(mac=[b"hmac-sha2-256", b"hmac-sha1"]),
                 {"mac_cs": "hmac-sha2-256,hmac-sha1", "mac_sc": "hmac-sha2-256,hmac-sha1"}, id="mac"),
    # An AEAD cipher needs no MAC: the MAC lists do not matter then.
    pytest.param(_kexinit(cipher=[b"aes128-gcm@openssh.com"], mac=[b"hmac-sha1"]), {}, id="aead"),
    pytest.param(_kexinit(cipher=[b"aes128-cbc"], mac=[b"hmac-sha1"]),
                 {"cipher_cs": "aes128-cbc", "cipher_sc": "aes128-cbc"}, id="cipher"),
])
def test_unmatched(client, missing):
    assert handshake.unmatched(client, SERVER) == missing
