"""meshsshd.asyncssh_tuning: when the ignore-packet patch applies or refuses, and what an
asyncssh client really receives over a loopback connection with and without it."""

from __future__ import annotations

import logging

import asyncssh
import pytest
from asyncssh import connection as conn_mod

from meshsshd import asyncssh_tuning

PAYLOAD = bytes(range(256)) * 4096          # 1 MiB: ~32 data packets of 32 KiB


@pytest.fixture
def pristine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with asyncssh unpatched and leaves it as it found it."""
    current = conn_mod.SSHConnection.send_packet
    monkeypatch.setattr(conn_mod.SSHConnection, "send_packet", getattr(current, "__wrapped__", current))
    monkeypatch.setattr(asyncssh_tuning, "_applied", False)


# ---- refusal: version range and shape ---------------------------------------------------
def _changed_shape(self, pkttype, *args, handler=None):   # no ignore insertion in here
    self._send(bytes([pkttype]) + b"".join(args))


def _changed_signature(self, pkttype, payload):
    if self._send_encryption and pkttype > MSG_KEX_LAST:  # noqa: F821 - only the names count
        self.send_packet(MSG_IGNORE, String(b""))  # noqa: F821


@pytest.mark.parametrize("version, send_packet, reason", [
    pytest.param("2.24.1", "real", None, id="checked-version"),
    pytest.param("2.24.7", "real", None, id="later-patch-release"),
    pytest.param("2.24.0", "real", "version-not-checked", id="older"),
    pytest.param("2.25.0", "real", "version-not-checked", id="next-minor"),
    pytest.param("3.0", "real", "version-not-checked", id="next-major"),
    pytest.param("2.24.1.dev0+g1", "real", None, id="dev-suffix-after-three-parts"),
    pytest.param("dev", "real", "version-not-checked", id="unparsable"),
    pytest.param("2.24.1", _changed_shape, "send-packet-changed", id="no-ignore-insertion"),
    pytest.param("2.24.1", _changed_signature, "send-packet-changed", id="other-parameters"),
])
def test_refusal(pristine, version, send_packet, reason):
    fn = conn_mod.SSHConnection.send_packet if send_packet == "real" else send_packet
    assert asyncssh_tuning.refusal(version, fn) == reason


def test_refused_version_leaves_asyncssh_alone_and_warns(pristine, monkeypatch, caplog):
    original = conn_mod.SSHConnection.send_packet
    monkeypatch.setattr(asyncssh, "__version__", "2.26.0")
    with caplog.at_level(logging.WARNING, logger="meshsshd.asyncssh_tuning"):
        assert asyncssh_tuning.skip_ignore_packets() is False
    assert conn_mod.SSHConnection.send_packet is original
    [record] = caplog.records
    assert record.getMessage() == "asyncssh-tuning.refused"
    assert record.fields["reason"] == "version-not-checked"


def test_applies_once(pristine):
    original = conn_mod.SSHConnection.send_packet
    assert asyncssh_tuning.skip_ignore_packets() is True
    patched = conn_mod.SSHConnection.send_packet
    assert patched is not original and patched.__wrapped__ is original
    assert asyncssh_tuning.skip_ignore_packets() is True
    assert conn_mod.SSHConnection.send_packet is patched


# ---- a real loopback connection ----------------------------------------------------------
class _OpenServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False    # no authentication: the test is about packets after it


def _write_payload(process: asyncssh.SSHServerProcess) -> None:
    process.stdout.write(PAYLOAD)
    process.exit(0)


async def _download(cipher: str, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, int]:
    """Fetch PAYLOAD over SSH with `cipher`; return it and the ignore packets the client got."""
    received = 0
    process_ignore = conn_mod.SSHConnection._packet_handlers[asyncssh.constants.MSG_IGNORE]

    def count(self, pkttype, pktid, packet):
        nonlocal received
        received += 1
        return process_ignore(self, pkttype, pktid, packet)

    monkeypatch.setitem(conn_mod.SSHConnection._packet_handlers, asyncssh.constants.MSG_IGNORE, count)
    server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                                   server_factory=_OpenServer, process_factory=_write_payload,
                                   encryption_algs=[cipher], encoding=None)
    try:
        port = server.sockets[0].getsockname()[1]
        async with asyncssh.connect("127.0.0.1", port, username="u", known_hosts=None, client_keys=None,
                                    encryption_algs=[cipher], encoding=None) as conn:
            result = await conn.run("get", check=True)
            assert conn.get_extra_info("recv_cipher") == cipher
    finally:
        server.close()
        await server.wait_closed()
    return result.stdout, received


async def test_unpatched_asyncssh_sends_an_ignore_per_packet(pristine, monkeypatch):
    data, ignores = await _download("aes128-gcm@openssh.com", monkeypatch)
    assert data == PAYLOAD
    assert ignores >= len(PAYLOAD) // 32768     # one before every data packet (and more)


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"])
async def test_patched_non_cbc_connection_sends_no_ignore(pristine, monkeypatch, cipher):
    assert asyncssh_tuning.skip_ignore_packets()
    data, ignores = await _download(cipher, monkeypatch)
    assert data == PAYLOAD
    assert ignores == 0


async def test_patched_cbc_connection_keeps_the_ignore(pristine, monkeypatch):
    assert asyncssh_tuning.skip_ignore_packets()
    data, ignores = await _download("aes128-cbc", monkeypatch)
    assert data == PAYLOAD
    assert ignores >= len(PAYLOAD) // 32768
