"""Password hashing for local users (argon2id via argon2-cffi).

The verification page (`management/idp`) and `meshmgmt init` use these two functions;
nothing else should touch password hashes.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()

# Verified against when a user has no password, so a missing user costs as much time as
# a wrong password (no user-enumeration by timing).
_DUMMY_HASH = _hasher.hash("meshsshd-dummy-password")


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
