"""meshsshd.asyncssh_keyopts: when key options may be restored onto asyncssh's connection,
and that a refusal is decided once, with one warning. The restore itself (a forced
command applies to its key's login, and to nothing else) is tested through the real
server in tests/integration/test_authorized_keys_login.py."""

from __future__ import annotations

import logging

import asyncssh
import pytest
from asyncssh import connection as conn_mod

from meshsshd import asyncssh_keyopts


class _ReadsElsewhere(conn_mod.SSHServerConnection):
    def get_key_option(self, option, default=None):  # options kept some other way
        return self._options_v2.get(option, default)


@pytest.mark.parametrize("version, cls, reason", [
    pytest.param("2.24.1", conn_mod.SSHServerConnection, None, id="checked-version"),
    pytest.param("2.25.0", conn_mod.SSHServerConnection, "version-not-checked", id="next-minor"),
    pytest.param("2.24.1", _ReadsElsewhere, "get_key_option-changed", id="reader-changed"),
])
def test_refusal(version, cls, reason):
    assert asyncssh_keyopts.refusal(version, cls) == reason


def test_unchecked_asyncssh_refuses_once_and_warns(monkeypatch, caplog):
    monkeypatch.setattr(asyncssh_keyopts, "_verdict", None)
    monkeypatch.setattr(asyncssh, "__version__", "2.26.0")
    with caplog.at_level(logging.WARNING, logger="meshsshd.asyncssh_keyopts"):
        assert asyncssh_keyopts.enforceable() is False
        assert asyncssh_keyopts.enforceable() is False
    [record] = caplog.records
    assert record.getMessage() == "asyncssh-keyopts.refused" and record.fields["reason"] == "version-not-checked"
    with pytest.raises(AssertionError):
        asyncssh_keyopts.restore(object(), {"command": "x"})


def test_checked_asyncssh_restores(monkeypatch):
    monkeypatch.setattr(asyncssh_keyopts, "_verdict", None)

    class Conn:
        _key_options: dict = {}

    conn = Conn()
    asyncssh_keyopts.restore(conn, {"command": "echo a"})
    assert conn._key_options == {"command": "echo a"}
