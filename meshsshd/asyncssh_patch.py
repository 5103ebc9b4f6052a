"""What the guarded asyncssh patches share (asyncssh_tuning, asyncssh_ping, asyncssh_kexguess, asyncssh_sigalgs,
asyncssh_keyopts, asyncssh_close, asyncssh_caps): which versions their reading of asyncssh's
internals holds for, and the one-line report of applying or refusing a patch."""

from __future__ import annotations

import logging
from collections.abc import Callable

import asyncssh
from asyncssh import channel as _chan

from .logs import event

# The asyncssh versions whose internals were read for the patches (pyproject pins the same).
CHECKED_VERSIONS = ((2, 24, 1), (2, 25))


def _version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in text.split(".")[:3])
    except ValueError:
        return None


def version_checked(version: str) -> bool:
    """Whether `version` is one whose internals our patches were read against."""
    parsed = _version(version)
    low, high = CHECKED_VERSIONS
    return parsed is not None and low <= parsed < high


def apply_guarded(log: logging.Logger, name: str, why: str | None, patch: Callable[[], None], *,
                  change: str, effect: str) -> bool:
    """Run `patch` unless there is a reason not to; one event either way, `<name>.applied`
    with what changed or `<name>.refused` (a warning) with the reason and its effect."""
    if why is not None:
        event(log, f"{name}.refused", logging.WARNING, reason=why, asyncssh=asyncssh.__version__, effect=effect)
        return False
    patch()
    event(log, f"{name}.applied", change=change, asyncssh=asyncssh.__version__)
    return True


def server_channel_handler(msg: int, handler: Callable[..., None]) -> Callable[[], None]:
    """A patch installing `handler` for message `msg` on asyncssh's server channels only
    (sessions; client and forwarding channels keep asyncssh's own table)."""
    def patch() -> None:
        handlers = dict(_chan.SSHServerChannel._packet_handlers)
        handlers[msg] = handler
        _chan.SSHServerChannel._packet_handlers = handlers
    return patch


def guard_server_channel_handler(log: logging.Logger, name: str, msg: int, original: Callable[..., None],
                                 wrap: Callable[[Callable[..., None]], Callable[..., None]],
                                 refusal: Callable[[str, Callable[..., None]], str | None], *,
                                 change: str, effect: str) -> bool:
    """The server-channel patches' one shape (asyncssh_caps, asyncssh_close): judge
    asyncssh's `original` handler for `msg`, then install `wrap(original)` for server
    channels only, with apply_guarded's one event either way."""
    return apply_guarded(log, name, refusal(asyncssh.__version__, original),
                         server_channel_handler(msg, wrap(original)), change=change, effect=effect)
