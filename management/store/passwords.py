"""Password hashing for local users (argon2id via argon2-cffi), and the rules a new
password must meet.

The verification page (`management/idp`), `meshmgmt init` and the user routes use these
functions; nothing else should touch password hashes or restate the rules.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()

MIN_LENGTH = 8
MAX_LENGTH = 1024  # argon2 takes any length; this bounds the work a request can cause

# Verified against when a user has no password, so a missing user costs as much time as
# a wrong password (no user-enumeration by timing).
_DUMMY_HASH = _hasher.hash("meshsshd-dummy-password")


def password_problem(password: str) -> str | None:
    """What is wrong with `password` as a new password ("must have …"), or None. The one
    rule set of `meshmgmt init`, user creation, an admin's reset and a user's own change."""
    if len(password) < MIN_LENGTH:
        return f"must have at least {MIN_LENGTH} characters"
    if len(password) > MAX_LENGTH:
        return f"must have at most {MAX_LENGTH} characters"
    return None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True iff `password` matches; a None hash (no password set) never matches."""
    try:
        if password_hash is None:
            _hasher.verify(_DUMMY_HASH, password)
            return False
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def hash_password_async(password: str) -> str:
    """argon2 takes ~50-100 ms of CPU: run it off the event loop."""
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, hash_password, password)


async def verify_password_async(password_hash: str | None, password: str) -> bool:
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(
        None, verify_password, password_hash, password
    )
