"""sshd's ChannelTimeout (`session=…`) and UnusedConnectionTimeout: close what has been
idle that long. One small timer each, checking four times a timeout, so the cost of
activity is a timestamp and nothing closes more than a quarter of the timeout late."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from .errors import ConfigError

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class IdleWatch:
    """Calls `on_idle` once nothing touched it, and `busy()` was false, for `timeout` s."""

    def __init__(self, timeout: float, on_idle: Callable[[], None],
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.timeout = timeout
        self._on_idle = on_idle
        self._busy = busy
        self._last = time.monotonic()
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(timeout / 4, self._check)

    def touch(self) -> None:
        self._last = time.monotonic()

    def _check(self) -> None:
        now = time.monotonic()
        if self._busy():
            self._last = now
        if now - self._last >= self.timeout:
            self._handle = None
            self._on_idle()
            return
        self._handle = asyncio.get_running_loop().call_later(self.timeout / 4, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def parse_duration(text: str, where: str) -> float:
    """"30", "45s", "5m", "1h" → seconds (> 0)."""
    m = re.fullmatch(r"(\d+)([smhdw]?)", text.strip())
    if not m or int(m[1]) == 0:
        raise ConfigError(f"{where} {text!r}: a duration such as 30s, 5m or 1h")
    return float(int(m[1]) * _UNITS[m[2]])


def parse_channel_timeout(text: str) -> float:
    """sshd's `ChannelTimeout` for session channels: "session=5m" → 300.0 (only the
    session type exists here: forwards end with their sockets)."""
    kind, eq, value = text.partition("=")
    if not eq or kind.strip() != "session":
        raise ConfigError(f"channel_timeout {text!r}: expected \"session=DURATION\" (e.g. session=5m); "
                          "only session channels have a timeout here")
    return parse_duration(value, "channel_timeout")
