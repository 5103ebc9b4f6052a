"""meshsshd.asyncssh_close and asyncssh_caps: when the channel patches apply or refuse,
the caps' arithmetic, and that they touch server session channels only. Their effect on
the wire is tested in tests/integration/test_session_robustness.py."""

from __future__ import annotations

import pytest
from asyncssh import channel as chan_mod

from meshsshd import asyncssh_caps, asyncssh_close


@pytest.fixture
def pristine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with asyncssh's server channel unpatched and leaves it so."""
    if "_packet_handlers" in vars(chan_mod.SSHServerChannel):
        monkeypatch.delattr(chan_mod.SSHServerChannel, "_packet_handlers")
    monkeypatch.setattr(asyncssh_close, "_applied", False)
    monkeypatch.setattr(asyncssh_caps, "_applied", False)


def _other() -> None:
    """A handler built some other way."""


@pytest.mark.parametrize("module, handler", [
    (asyncssh_close, chan_mod.SSHChannel._process_close),
    (asyncssh_caps, chan_mod.SSHChannel._process_request),
])
def test_refusal(module, handler):
    assert module.refusal("2.24.1", handler) is None
    assert module.refusal("2.25.0", handler) == "version-not-checked"
    assert module.refusal("2.24.1", _other) is not None


def test_over_cap():
    assert asyncssh_caps.over_cap(b"env", asyncssh_caps.MAX_ENV - 1, 0) is None
    assert asyncssh_caps.over_cap(b"env", asyncssh_caps.MAX_ENV, 0) == "env"
    assert asyncssh_caps.over_cap(b"window-change", asyncssh_caps.MAX_ENV, 0) is None
    assert asyncssh_caps.over_cap(b"exec", 0, asyncssh_caps.MAX_QUEUED) == "queued-requests"


def test_patches_touch_server_channels_only(pristine):
    assert asyncssh_close.hold_closed_sessions() and asyncssh_caps.cap_channel_requests()
    server = chan_mod.SSHServerChannel._packet_handlers
    base = chan_mod.SSHChannel._packet_handlers
    for msg, original in ((chan_mod.MSG_CHANNEL_CLOSE, chan_mod.SSHChannel._process_close),
                          (chan_mod.MSG_CHANNEL_REQUEST, chan_mod.SSHChannel._process_request)):
        assert server[msg].__wrapped__ is original
        assert base[msg] is original
    assert chan_mod.SSHClientChannel._packet_handlers is base
