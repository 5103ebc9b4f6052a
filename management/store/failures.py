"""What went wrong when the database refused a write, in words an operator can act on.

SQLAlchemy's own message ends in a footer URL and names no cause an admin can act on; the
driver's error underneath does ("database or disk is full", SQLSTATE 53100). A store that
cannot write is a condition of the server, not of the request: it answers 503 with the
reason, and `/healthz` reports it until a write succeeds again.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError, IntegrityError, DataError

# SQLSTATE classes of PostgreSQL that mean "the server cannot take writes now":
# 53 insufficient resources (53100 disk full), 08 connection, 57 operator intervention.
_PG_UNAVAILABLE = ("53", "08", "57")
_PG_DISK_FULL = "53100"
_SQLITE_UNAVAILABLE = ("database or disk is full", "disk i/o error", "unable to open database",
                       "database is locked", "readonly database")


@dataclass(frozen=True)
class StoreFailure:
    reason: str  # "disk full" or the database's own words, one line, no secrets
    disk_full: bool


def _driver_error(exc: DBAPIError) -> BaseException:
    orig = exc.orig
    # asyncpg's exception sits one level further down through SQLAlchemy's adaptor.
    if orig is None:
        return exc
    return getattr(orig, "__cause__", None) or orig


def store_failure(exc: BaseException) -> StoreFailure | None:
    """A StoreFailure when `exc` means the store cannot write at all; None for errors a
    request causes (a constraint, a bad value), which stay the request's fault."""
    if not isinstance(exc, DBAPIError) or isinstance(exc, (IntegrityError, DataError)):
        return None
    cause = _driver_error(exc)
    message = " ".join(str(cause).split())[:300] or type(cause).__name__
    sqlstate = str(getattr(cause, "sqlstate", "") or "")
    if sqlstate:
        if sqlstate == _PG_DISK_FULL:
            return StoreFailure(f"disk full: {message}", True)
        return StoreFailure(message, False) if sqlstate.startswith(_PG_UNAVAILABLE) else None
    lowered = message.lower()
    if any(marker in lowered for marker in _SQLITE_UNAVAILABLE):
        disk_full = "disk is full" in lowered
        return StoreFailure(f"disk full: {message}" if disk_full else message, disk_full)
    return None
