"""Helpers for detached-session tests: talk to `meshsshd-sessions@meshsshd` with OpenSSH,
and find/kill the holder processes a test left behind (they outlive the daemon on purpose).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

SUBSYSTEM = "meshsshd-sessions@meshsshd"


def holders_under(directory: Path) -> list[int]:
    """Pids of holder processes whose working directory is under `directory` (a holder
    chdirs into its sessions directory)."""
    root = str(Path(directory).resolve())
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if (cwd == root or cwd.startswith(root + "/")) and b"_holder.py" in cmdline:
            out.append(int(entry))
    return out


def kill_holders(directory: Path) -> None:
    """End every session (child process group) and holder under `directory`."""
    for meta_path in Path(directory).rglob("sessions/*.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("state") == "running" and meta.get("pid"):
            try:
                os.killpg(int(meta["pid"]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for pid in holders_under(directory):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def audit_events(log_text: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log_text.splitlines():
        if f'"audit.{name}"' in line:
            out.append(json.loads(line))
    return out
