"""meshsshd.asyncssh_ping: when the ping patch applies or refuses, and that it touches
server connections only. What a client receives over the wire is tested in
tests/integration/test_server_wire.py."""

from __future__ import annotations

import logging

import asyncssh
import pytest
from asyncssh import connection as conn_mod

from meshsshd import asyncssh_ping


@pytest.fixture
def pristine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with asyncssh's server class unpatched and leaves it so."""
    cls = conn_mod.SSHServerConnection
    if "_packet_handlers" in vars(cls):
        monkeypatch.delattr(cls, "_packet_handlers")
    current = cls._send_ext_info
    monkeypatch.setattr(cls, "_send_ext_info", getattr(current, "__wrapped__", current))
    monkeypatch.setattr(asyncssh_ping, "_applied", False)


class _NoExtInfoTable(conn_mod.SSHServerConnection):
    def _send_ext_info(self) -> None:  # built some other way
        self._send(b"")


class _AlreadyPings(conn_mod.SSHServerConnection):
    _packet_handlers = {**conn_mod.SSHConnection._packet_handlers, 192: lambda *a: None}


@pytest.mark.parametrize("version, cls, reason", [
    pytest.param("2.24.1", None, None, id="checked-version"),
    pytest.param("2.25.0", None, "version-not-checked", id="next-minor"),
    pytest.param("dev", None, "version-not-checked", id="unparsable"),
    pytest.param("2.24.1", _NoExtInfoTable, "ext-info-changed", id="ext-info-built-differently"),
    pytest.param("2.24.1", _AlreadyPings, "asyncssh-answers-pings", id="upstream-support"),
])
def test_refusal(pristine, version, cls, reason):
    assert asyncssh_ping.refusal(version, cls or conn_mod.SSHServerConnection) == reason


def test_refused_version_leaves_asyncssh_alone_and_warns(pristine, monkeypatch, caplog):
    monkeypatch.setattr(asyncssh, "__version__", "2.26.0")
    with caplog.at_level(logging.WARNING, logger="meshsshd.asyncssh_ping"):
        assert asyncssh_ping.answer_pings() is False
    assert 192 not in conn_mod.SSHServerConnection._packet_handlers
    [record] = caplog.records
    assert record.getMessage() == "asyncssh-ping.refused"
    assert record.fields["reason"] == "version-not-checked"


def test_applies_once_and_to_servers_only(pristine):
    assert asyncssh_ping.answer_pings() is True
    server = conn_mod.SSHServerConnection
    table, send = server._packet_handlers, server._send_ext_info
    assert 192 in table and 193 in table
    assert 192 not in conn_mod.SSHClientConnection._packet_handlers
    assert 192 not in conn_mod.SSHConnection._packet_handlers
    assert asyncssh_ping.answer_pings() is True
    assert server._packet_handlers is table and server._send_ext_info is send
