"""Stored grants: device codes, refresh tokens, user and client authentication.

The decisions are pure (`device.poll`, `device.decide`, `judge_refresh`); this module
loads rows, applies the decision and writes it back with compare-and-set updates, so
two replicas (or two racing requests) can never both redeem one device code or one
refresh token.

Refresh tokens rotate on every use. Presenting a token that was already used or revoked
means two parties hold it (the OAuth 2.0 Security BCP's reuse detection): the whole
family (every token descended from the same login) is revoked and the user logs in again.
A family also ends at a fixed time after its login (`refresh_family_ttl`), however often
it is used, and all of a user's families end when the user's password or role changes or
an admin blocks the user (`revoke_user_families`; deleting the user deletes its rows).

Each revoked row keeps why (`revoked_reason`), so a refusal says what happened, and each
refusal names its fix once (`_refused`): the client shows it as it comes. A blocked
user's token is refused as blocked before any reuse check: the block revoked every live
token already, so such a refusal is no sign of theft.
"""

from __future__ import annotations

import enum
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, distinct, func, select, update
from sqlalchemy.exc import IntegrityError

from meshmgmt.store.models import User, aware, hash_secret, new_id
from meshmgmt.store.passwords import verify_password_async
from meshsshd.logs import event

from . import device
from .errors import IdpError
from .models import DeviceCodeRow, RefreshTokenRow
from .tokens import Identity

log = logging.getLogger("meshmgmt.idp")

REFRESH_PREFIX = "mrt_"
RELOGIN = "run `meshssh login`"
BLOCKED = "your account is blocked by an administrator; ask one to unblock it, then run `meshssh login`"

# What ended a login, by the `revoked_reason` its tokens carry (first match wins), for
# the refusal of a revoked token.
_REVOKED_BECAUSE = (
    ("blocked", "this login was signed out when an administrator blocked your account"),
    ("password-reset", "this login was signed out when an administrator set a new password for your account"),
    ("password-changed", "this login was signed out when your password was changed"),
    ("role-changed", "this login was signed out when an administrator changed your role"),
    ("refresh-reused", "this login was revoked because one of its refresh tokens was used twice "
                       "(a copy of it may exist elsewhere)"),
)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def _ts(dt: datetime | None) -> float | None:
    dt = aware(dt)
    return dt.timestamp() if dt is not None else None


def identity_of(user: User) -> Identity:
    return Identity(sub=user.id, email=user.email, name=user.name or "", role=user.role or "user",
                    service=bool(user.is_service))


class RefreshVerdict(str, enum.Enum):
    OK = "ok"
    UNKNOWN = "unknown-refresh-token"
    WRONG_CLIENT = "wrong-client"
    EXPIRED = "refresh-expired"
    FAMILY_EXPIRED = "refresh-family-expired"
    REUSED = "refresh-reused"
    REVOKED = "refresh-revoked"


def judge_refresh(*, client_matches: bool, used: bool, revoked: bool, expires_at: float,
                  family_expires_at: float, now: float) -> RefreshVerdict:
    """What presenting a known refresh token means. Reuse wins over every other answer."""
    if revoked:
        return RefreshVerdict.REVOKED
    if used:
        return RefreshVerdict.REUSED
    if not client_matches:
        return RefreshVerdict.WRONG_CLIENT
    if now >= family_expires_at:
        return RefreshVerdict.FAMILY_EXPIRED
    if now >= expires_at:
        return RefreshVerdict.EXPIRED
    return RefreshVerdict.OK


def revoked_text(reasons: str | None) -> str:
    """What a revoked token's `revoked_reason` (comma-separated causes) tells its holder."""
    causes = set((reasons or "").split(","))
    return next((text for cause, text in _REVOKED_BECAUSE if cause in causes), "this login was revoked")


def _refused(what: str, reason: str) -> IdpError:
    """A refresh token's refusal: what happened, then the fix, each said once."""
    return IdpError("invalid_grant", f"{what}; {RELOGIN}", reason=reason)


def blocked(error: str = "invalid_grant") -> IdpError:
    """The refusal of whatever a blocked user asks for: no theft alarm, and the fix that
    works (a new login alone would be refused too)."""
    return IdpError(error, BLOCKED, reason="user-blocked")


async def revoke_user_families(session: Any, user_id: str, why: str) -> int:
    """Revoke every refresh token of a user (spent ones too, so a copy presented later is
    told `why`, not taken for a theft), inside the caller's transaction: the change that
    made them stale commits with it. How many logins were live."""
    live = await session.execute(
        select(func.count(distinct(RefreshTokenRow.family_id)))
        .where(RefreshTokenRow.user_id == user_id, RefreshTokenRow.revoked_at.is_(None),
               RefreshTokenRow.used_at.is_(None))
    )
    await session.execute(
        update(RefreshTokenRow)
        .where(RefreshTokenRow.user_id == user_id, RefreshTokenRow.revoked_at.is_(None))
        .values(revoked_at=datetime.now(timezone.utc), revoked_reason=why)
    )
    revoked = int(live.scalar() or 0)
    event(log, "idp.user_refresh_revoked", user=user_id, reason=why, logins=revoked)
    return revoked


@dataclass(frozen=True)
class DeviceStart:
    device_code: str
    user_code: str
    expires_in: int
    interval: int


_POLL_MESSAGES = {
    device.PollOutcome.PENDING: "the user has not approved the code yet",
    device.PollOutcome.SLOW_DOWN: "polling too fast; wait longer between requests",
    device.PollOutcome.EXPIRED: "the device code has expired; start the login again",
    device.PollOutcome.DENIED: "the user denied the login",
    device.PollOutcome.USED: "the device code was already used",
}


class Grants:
    def __init__(self, store, *, clock: Callable[[], float], device_ttl: int, poll_interval: int,
                 refresh_ttl: int, refresh_family_ttl: int) -> None:
        self.store = store
        self.clock = clock
        self.device_ttl = device_ttl
        self.poll_interval = poll_interval
        self.refresh_ttl = refresh_ttl
        self.refresh_family_ttl = refresh_family_ttl

    # --- users and clients ----------------------------------------------------------

    async def active_identity(self, user_id: str, error: str) -> Identity:
        """The user as stored now, or the OAuth `error` saying they are blocked or deleted."""
        async with self.store.session() as s:
            user = await s.get(User, user_id)
        if user is None:
            raise IdpError(error, "your account no longer exists on this management server; "
                           "ask an administrator", reason="user-deleted")
        if user.blocked:
            raise blocked(error)
        return identity_of(user)

    async def authenticate_user(self, email: str, password: str) -> Identity | None:
        """Email + password of a local (non-service, unblocked) user; constant work on misses.
        Emails are stored lower-case (the API normalises them), so the unique index serves."""
        async with self.store.session() as s:
            user = (
                await s.execute(select(User).where(User.email == email.strip().lower()))
            ).scalar_one_or_none()
        usable = user is not None and not user.blocked and not user.is_service
        ok = await verify_password_async(user.password_hash if usable and user else None, password)
        if not (ok and usable and user):
            return None
        return identity_of(user)

    async def authenticate_client(self, client_id: str, client_secret: str) -> Identity:
        async with self.store.session() as s:
            user = (
                await s.execute(select(User).where(User.client_id == client_id, User.is_service.is_(True)))
            ).scalar_one_or_none()
        digest = hash_secret(client_secret)
        expected = (user.client_secret_hash if user else None) or "0" * 64
        if user is None or not hmac.compare_digest(digest, expected):
            raise IdpError("invalid_client", "client authentication failed", status=401, reason="bad-client-secret")
        if user.blocked:
            raise IdpError("invalid_client", "this service user is blocked", status=401, reason="user-blocked")
        return identity_of(user)

    # --- device authorization grant -------------------------------------------------

    async def start_device(self, client_id: str, scope: str) -> DeviceStart:
        now = self.clock()
        grant = device.new_grant(now, self.device_ttl, self.poll_interval)
        async with self.store.write() as s:
            await s.execute(delete(DeviceCodeRow).where(DeviceCodeRow.expires_at < _dt(now)))
        for _ in range(5):  # a user-code collision among live grants is rare; draw again
            device_code, user_code = device.new_device_code(), device.new_user_code()
            try:
                async with self.store.write() as s:
                    s.add(DeviceCodeRow(
                        device_code_hash=device.hash_secret(device_code), user_code=user_code,
                        client_id=client_id, scope=scope, status=grant.status.value,
                        created=_dt(now), expires_at=_dt(grant.expires_at), interval=grant.interval,
                    ))
            except IntegrityError:
                continue
            return DeviceStart(device_code, user_code, self.device_ttl, grant.interval)
        raise IdpError("server_error", "could not allocate a user code", status=503, reason="user-code-space")

    @staticmethod
    def _grant(row: DeviceCodeRow) -> device.DeviceGrant:
        expires = _ts(row.expires_at)
        assert expires is not None
        return device.DeviceGrant(status=device.DeviceStatus(row.status), expires_at=expires,
                                  interval=row.interval, last_polled_at=_ts(row.last_polled_at),
                                  user_id=row.user_id)

    async def pending_user_code(self, user_code: str) -> bool:
        """Whether a code can still be approved (used to word the page; not a secret check)."""
        async with self.store.session() as s:
            row = (await s.execute(select(DeviceCodeRow).where(DeviceCodeRow.user_code == user_code))).scalar_one_or_none()
        if row is None:
            return False
        g = self._grant(row)
        return g.status is device.DeviceStatus.PENDING and self.clock() < g.expires_at

    async def decide_device(self, user_code: str, user_id: str, approve: bool) -> device.DecisionRefused | None:
        now = self.clock()
        async with self.store.write() as s:
            row = (await s.execute(select(DeviceCodeRow).where(DeviceCodeRow.user_code == user_code))).scalar_one_or_none()
            if row is None:
                return device.DecisionRefused.EXPIRED
            result = device.decide(self._grant(row), approve, user_id, now)
            if isinstance(result, device.DecisionRefused):
                return result
            done = await s.execute(
                update(DeviceCodeRow)
                .where(DeviceCodeRow.id == row.id, DeviceCodeRow.status == device.DeviceStatus.PENDING.value)
                .values(status=result.status.value, user_id=user_id)
            )
            if done.rowcount != 1:
                await s.rollback()
                return device.DecisionRefused.ALREADY_DECIDED
        return None

    async def poll_device(self, device_code: str, client_id: str) -> tuple[str, str]:
        """(user id, scope) once approved; otherwise IdpError with the RFC 8628 code.

        One write transaction (on SQLite BEGIN IMMEDIATE): the read and the update of the
        row cannot be split by another poll or by the approval."""
        now = self.clock()
        async with self.store.write() as s:
            row = (
                await s.execute(
                    select(DeviceCodeRow)
                    .where(DeviceCodeRow.device_code_hash == device.hash_secret(device_code))
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if row is None:
                raise IdpError("invalid_grant", "unknown device code", reason="unknown-device-code")
            if row.client_id != client_id:
                raise IdpError("invalid_grant", "the device code was issued to another client", reason="wrong-client")
            outcome, new = device.poll(self._grant(row), now)
            polled = _dt(new.last_polled_at) if new.last_polled_at is not None else None
            if outcome is device.PollOutcome.ISSUE:
                done = await s.execute(
                    update(DeviceCodeRow)
                    .where(DeviceCodeRow.id == row.id, DeviceCodeRow.status == device.DeviceStatus.APPROVED.value)
                    .values(status=device.DeviceStatus.CONSUMED.value, last_polled_at=polled)
                )
                if done.rowcount != 1:
                    await s.rollback()
                    outcome = device.PollOutcome.USED
                else:
                    assert row.user_id is not None
                    return row.user_id, row.scope
            elif outcome is not device.PollOutcome.USED and outcome is not device.PollOutcome.EXPIRED:
                row.interval = new.interval
                row.last_polled_at = polled
        raise IdpError(outcome.value, _POLL_MESSAGES[outcome], reason=outcome.value)

    # --- refresh tokens -------------------------------------------------------------

    async def issue_refresh(self, user_id: str, client_id: str, scope: str,
                            family: tuple[str, float] | None = None) -> str:
        """A refresh token of a new login, or the successor in `family` (id, end time)."""
        now = self.clock()
        token = REFRESH_PREFIX + secrets.token_urlsafe(32)
        family_id, family_end = family or (new_id(), now + self.refresh_family_ttl)
        async with self.store.write() as s:
            s.add(RefreshTokenRow(
                token_hash=device.hash_secret(token), family_id=family_id, user_id=user_id,
                client_id=client_id, scope=scope, created=_dt(now),
                expires_at=_dt(min(now + self.refresh_ttl, family_end)), family_expires_at=_dt(family_end),
            ))
        return token

    async def _revoke_family(self, family_id: str, now: float, why: str) -> None:
        """Revoke what is left of a login; a warning when that was anything (a reuse)."""
        async with self.store.write() as s:
            result = await s.execute(
                update(RefreshTokenRow)
                .where(RefreshTokenRow.family_id == family_id, RefreshTokenRow.revoked_at.is_(None))
                .values(revoked_at=_dt(now), revoked_reason=why)
            )
        revoked = int(result.rowcount or 0)
        event(log, "idp.refresh_family_revoked", level=logging.WARNING if revoked else logging.INFO,
              family=family_id, reason=why, revoked=revoked)

    async def rotate_refresh(self, token: str, client_id: str) -> tuple[Identity, str, str]:
        """Redeem a refresh token: (identity, scope, successor token); the old one is spent."""
        now = self.clock()
        async with self.store.session() as s:
            row = (
                await s.execute(select(RefreshTokenRow).where(RefreshTokenRow.token_hash == device.hash_secret(token)))
            ).scalar_one_or_none()
            user = await s.get(User, row.user_id) if row is not None else None
        if row is None or user is None:  # deleting a user deletes its rows: unknown either way
            raise _refused("unknown refresh token", RefreshVerdict.UNKNOWN.value)
        if user.blocked:
            raise blocked()
        expires, family_end = _ts(row.expires_at), _ts(row.family_expires_at)
        assert expires is not None and family_end is not None
        verdict = judge_refresh(client_matches=row.client_id == client_id, used=row.used_at is not None,
                                revoked=row.revoked_at is not None, expires_at=expires,
                                family_expires_at=family_end, now=now)
        if verdict is RefreshVerdict.OK:
            async with self.store.write() as s:
                spent = await s.execute(
                    update(RefreshTokenRow)
                    .where(RefreshTokenRow.id == row.id, RefreshTokenRow.used_at.is_(None),
                           RefreshTokenRow.revoked_at.is_(None))
                    .values(used_at=_dt(now))
                )
            if spent.rowcount != 1:  # someone redeemed it between our read and write
                verdict = RefreshVerdict.REUSED
        if verdict is RefreshVerdict.REUSED:
            await self._revoke_family(row.family_id, now, verdict.value)
            raise _refused("this refresh token was already used, so every token of this login is revoked",
                           verdict.value)
        if verdict is RefreshVerdict.REVOKED:
            await self._revoke_family(row.family_id, now, row.revoked_reason or verdict.value)
            raise _refused(revoked_text(row.revoked_reason), verdict.value)
        if verdict is RefreshVerdict.WRONG_CLIENT:
            raise _refused("the refresh token was issued to another client", verdict.value)
        if verdict is RefreshVerdict.FAMILY_EXPIRED:
            ttl = self.refresh_family_ttl
            age = f"{ttl // 86400} days" if ttl >= 86400 else f"{ttl} s"
            raise _refused(f"this login has reached its maximum age ({age})", verdict.value)
        if verdict is RefreshVerdict.EXPIRED:
            raise _refused("the refresh token has expired", verdict.value)
        try:
            ident = await self.active_identity(row.user_id, "invalid_grant")
        except IdpError:  # blocked or deleted since the read above
            await self._revoke_family(row.family_id, now, "blocked")
            raise
        successor = await self.issue_refresh(row.user_id, client_id, row.scope, (row.family_id, family_end))
        return ident, row.scope, successor

    async def housekeeping(self) -> None:
        """Drop expired device codes and refresh tokens that expired a day ago."""
        now = self.clock()
        async with self.store.write() as s:
            await s.execute(delete(DeviceCodeRow).where(DeviceCodeRow.expires_at < _dt(now)))
            await s.execute(delete(RefreshTokenRow).where(RefreshTokenRow.expires_at < _dt(now) - timedelta(days=1)))
