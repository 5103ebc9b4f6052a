"""Remove the forwarded-agent socket directory without `TemporaryDirectory.cleanup` as root.

asyncssh makes the agent socket of `ssh -A` in a `tempfile.TemporaryDirectory`, and the
session hands that directory to the user (meshsshd/session/_exec.py, as sshd does). When
the connection closes, asyncssh's `SSHAgentListener.close()` calls the directory's
`cleanup()` — as root, on a directory the user owns. Before CPython 3.11.8 (CVE-2023-6597,
this machine has 3.11.7) that cleanup, on a permission error, chmods what it finds and
follows symlinks while doing so: the user could make root change the mode of any file.
Requiring 3.11.8 would make the project uninstallable where 3.11.7 is what there is, so
instead `safe_agent_cleanup()` replaces that one `close()`: it detaches the directory's
finalizer (so no cleanup runs later either) and removes the tree with `shutil.rmtree`,
which on Linux works through directory descriptors, never follows a symlink, and changes
no modes; whatever cannot be removed stays (a log line), nothing outside is touched.

As the other asyncssh patches: checked versions and shape only, else one warning and
asyncssh as it is (with the CVE on old Pythons).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import asyncssh
from asyncssh import agent as _agent

from .asyncssh_patch import apply_guarded, version_checked
from .logs import event

log = logging.getLogger(__name__)

_CLOSE_NAMES = frozenset({"_unix_listener", "_tempdir", "cleanup", "close"})

_applied = False


def refusal(version: str, cls: type = _agent.SSHAgentListener) -> str | None:
    """Why this asyncssh must not be patched, or None if it may."""
    if not version_checked(version):
        return "version-not-checked"
    code = getattr(getattr(cls, "close", None), "__code__", None)
    if code is None or set(code.co_names) != _CLOSE_NAMES:
        return "close-changed"
    if not shutil.rmtree.avoids_symlink_attacks:  # type: ignore[attr-defined]
        return "rmtree-follows-symlinks"
    return None


def remove_tempdir(tempdir: Any) -> None:
    """Take a TemporaryDirectory down without its cleanup (see the module docstring)."""
    tempdir._finalizer.detach()  # noqa: SLF001 — or it would run cleanup() at exit

    def note(_func: Any, path: str, exc: Any) -> None:
        event(log, "agent-dir.left", logging.WARNING, path=path, error=str(exc[1] if isinstance(exc, tuple) else exc))

    shutil.rmtree(tempdir.name, onerror=note)


def _close(self: Any) -> None:
    self._unix_listener.close()
    remove_tempdir(self._tempdir)


def safe_agent_cleanup() -> bool:
    """Patch asyncssh once per process; True if applied."""
    global _applied
    if not _applied:
        cls = _agent.SSHAgentListener

        def patch() -> None:
            _close.__wrapped__ = cls.close  # type: ignore[attr-defined]
            cls.close = _close  # type: ignore[method-assign]

        _applied = apply_guarded(log, "asyncssh-agentdir", refusal(asyncssh.__version__, cls), patch,
                                 change="agent socket directory removed without chmod or symlinks",
                                 effect="the agent socket directory is removed by TemporaryDirectory.cleanup "
                                        "as root")
    return _applied
