"""meshsshd.asyncssh_agentdir: the forwarded-agent directory (owned by the user by then)
is removed without TemporaryDirectory.cleanup's chmod-through-symlinks (CVE-2023-6597),
and the patch refuses asyncssh versions and shapes it was not read against."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import asyncssh
import pytest
from asyncssh import agent as agent_mod

from meshsshd import asyncssh_agentdir


@pytest.fixture
def pristine(monkeypatch: pytest.MonkeyPatch) -> None:
    close = agent_mod.SSHAgentListener.close
    monkeypatch.setattr(agent_mod.SSHAgentListener, "close", getattr(close, "__wrapped__", close))
    monkeypatch.setattr(asyncssh_agentdir, "_applied", False)


class _Listener:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_closing_the_agent_listener_changes_no_mode_through_a_symlink(pristine, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The user planted a symlink to a file of root's in the agent directory, and the
    removal hits a permission error (failure injected: as for a daemon without
    CAP_FOWNER). TemporaryDirectory.cleanup would then chmod the link's target 0700."""
    assert asyncssh_agentdir.safe_agent_cleanup()
    target = tmp_path / "roots-file"
    target.write_text("secret")
    target.chmod(0o640)
    tempdir = tempfile.TemporaryDirectory(prefix="asyncssh-")
    os.symlink(target, Path(tempdir.name) / "agent")
    real_unlink = os.unlink
    failed: list[str] = []

    def unlink_once_denied(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == "agent" and not failed:
            failed.append(os.fspath(path))
            raise PermissionError(1, "Operation not permitted", os.fspath(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink_once_denied)
    listener = _Listener()
    agent_mod.SSHAgentListener(tempdir, str(Path(tempdir.name) / "agent"), listener).close()
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert failed and listener.closed
    assert target.stat().st_mode & 0o777 == 0o640 and target.read_text() == "secret"
    assert not tempdir._finalizer.alive  # no cleanup() left for interpreter exit either
    if os.path.lexists(tempdir.name):
        import shutil
        shutil.rmtree(tempdir.name)


@pytest.mark.parametrize("version, reason", [
    pytest.param("2.24.1", None, id="checked-version"),
    pytest.param("2.25.0", "version-not-checked", id="next-minor"),
])
def test_refusal(pristine, version, reason):
    assert asyncssh_agentdir.refusal(version) == reason


def test_changed_close_is_refused_with_one_warning(pristine, monkeypatch, caplog):
    def close(self):  # no tempdir cleanup in here any more
        self._unix_listener.close()

    monkeypatch.setattr(agent_mod.SSHAgentListener, "close", close)
    with caplog.at_level(logging.WARNING, logger="meshsshd.asyncssh_agentdir"):
        assert asyncssh_agentdir.safe_agent_cleanup() is False
    assert agent_mod.SSHAgentListener.close is close
    [record] = caplog.records
    assert record.fields["reason"] == "close-changed"
    assert asyncssh.__version__
