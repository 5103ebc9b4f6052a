"""RFC 8628 device authorization grant as a pure state machine.

A device grant is created pending; the verification page approves or denies it; the
client polls the token endpoint. Every transition is a function of the grant and `now`
that returns the outcome and the updated grant, so the storage layer only persists what
these functions return (the clock is injected; tests drive it by hand).

    pending ──approve──▶ approved ──poll──▶ consumed (tokens issued once)
       │  └──deny────▶ denied (polls: access_denied)
       └── now ≥ expires_at: expired_token, whatever the state (except consumed)

Polling faster than `interval` answers slow_down and adds 5 s to the interval for this
grant (RFC 8628 §3.5).
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass, replace

# No vowels (no words), no look-alikes such as 0/O or 1/I: RFC 8628 §6.1.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
DEVICE_CODE_TTL = 600
POLL_INTERVAL = 5
SLOW_DOWN_STEP = 5
# A client that sleeps exactly `interval` between polls must never be told to slow down.
POLL_TOLERANCE = 0.25


def new_user_code() -> str:
    raw = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    return f"{raw[:4]}-{raw[4:]}"


def normalize_user_code(text: str) -> str | None:
    """What a person typed ("bcdf ghjk", "BCDF-GHJK") → "BCDF-GHJK", or None if it cannot be one."""
    raw = "".join(ch for ch in text.upper() if ch not in "- \t")
    if len(raw) != USER_CODE_LENGTH or any(ch not in USER_CODE_ALPHABET for ch in raw):
        return None
    return f"{raw[:4]}-{raw[4:]}"


def new_device_code() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(value: str) -> str:
    """Lookup hash for high-entropy secrets (device codes, refresh tokens): SHA-256 suffices."""
    return hashlib.sha256(value.encode()).hexdigest()


class DeviceStatus(str, enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    CONSUMED = "consumed"


class PollOutcome(str, enum.Enum):
    PENDING = "authorization_pending"
    SLOW_DOWN = "slow_down"
    EXPIRED = "expired_token"
    DENIED = "access_denied"
    USED = "invalid_grant"
    ISSUE = "issue"


class DecisionRefused(str, enum.Enum):
    EXPIRED = "expired"
    ALREADY_DECIDED = "already-decided"


@dataclass(frozen=True)
class DeviceGrant:
    status: DeviceStatus
    expires_at: float
    interval: int
    last_polled_at: float | None = None
    user_id: str | None = None


def new_grant(now: float, ttl: int = DEVICE_CODE_TTL, interval: int = POLL_INTERVAL) -> DeviceGrant:
    return DeviceGrant(status=DeviceStatus.PENDING, expires_at=now + ttl, interval=interval)


def poll(grant: DeviceGrant, now: float) -> tuple[PollOutcome, DeviceGrant]:
    if grant.status is DeviceStatus.CONSUMED:
        return PollOutcome.USED, grant
    if now >= grant.expires_at:
        return PollOutcome.EXPIRED, grant
    if grant.status is DeviceStatus.DENIED:
        return PollOutcome.DENIED, replace(grant, last_polled_at=now)
    if grant.status is DeviceStatus.APPROVED:
        return PollOutcome.ISSUE, replace(grant, status=DeviceStatus.CONSUMED, last_polled_at=now)
    last = grant.last_polled_at
    if last is not None and now - last < grant.interval - POLL_TOLERANCE:
        return PollOutcome.SLOW_DOWN, replace(grant, interval=grant.interval + SLOW_DOWN_STEP, last_polled_at=now)
    return PollOutcome.PENDING, replace(grant, last_polled_at=now)


def decide(grant: DeviceGrant, approve: bool, user_id: str, now: float) -> DeviceGrant | DecisionRefused:
    """The signed-in user approves or denies; only a pending, unexpired grant can change."""
    if now >= grant.expires_at:
        return DecisionRefused.EXPIRED
    if grant.status is not DeviceStatus.PENDING:
        return DecisionRefused.ALREADY_DECIDED
    status = DeviceStatus.APPROVED if approve else DeviceStatus.DENIED
    return replace(grant, status=status, user_id=user_id)
