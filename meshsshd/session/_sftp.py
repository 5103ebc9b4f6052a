"""Which command serves a subsystem request.

`sftp` is the system `sftp-server`, started as the user like any command (kernel-enforced
permissions, every OpenSSH extension) and only when SFTP is enabled; asyncssh's in-process
SFTP server would run file operations as root. Other names come from `[subsystems]`.
"""

from __future__ import annotations

from ..config import ServerSettings


def resolve_subsystem(settings: ServerSettings, name: str) -> str | None:
    """Command line for subsystem `name`, or None when it is refused."""
    if name == "sftp":
        if not settings.sftp or not settings.sftp_server:
            return None
        return settings.subsystems.get("sftp") or settings.sftp_server
    return settings.subsystems.get(name)
