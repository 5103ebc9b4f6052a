"""Exceptions of the peer daemon.

    MeshsshdError                 base; carries `user_message` (safe to show a client)
    ├── ConfigError               a config file or flag is wrong; exit code 2
    ├── AuthRefused               a login was refused; `reason` is a stable code for
    │                             logs/metrics/tests, `user_message` goes to the client
    ├── StateError                the state directory is unusable (permissions, disk full)
    └── DataplaneError            WireGuard/nftables could not be configured
"""

from __future__ import annotations


class MeshsshdError(Exception):
    exit_code = 1

    def __init__(self, message: str, user_message: str | None = None) -> None:
        super().__init__(message)
        self.user_message = user_message or message


class ConfigError(MeshsshdError):
    exit_code = 2


class AuthRefused(MeshsshdError):
    """reason: a short stable code such as "expired", "wrong-audience", "replayed"."""

    def __init__(self, reason: str, user_message: str) -> None:
        super().__init__(f"{reason}: {user_message}", user_message)
        self.reason = reason


class StateError(MeshsshdError):
    pass


class DataplaneError(MeshsshdError):
    pass
