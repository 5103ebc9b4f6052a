"""The management store: models, engine/sessions, password helpers.

    from meshmgmt.store import Base, Store, User, hash_password, verify_password
"""

from .engine import Store, normalise_url, sqlite_url
from .models import (
    AdminToken,
    Base,
    Event,
    Group,
    Meta,
    Peer,
    PeerChallenge,
    Policy,
    SetupKey,
    User,
    aware,
    hash_secret,
    new_id,
    new_secret,
    utcnow,
)
from .passwords import hash_password, hash_password_async, verify_password, verify_password_async

__all__ = [
    "AdminToken",
    "Base",
    "Event",
    "Group",
    "Meta",
    "Peer",
    "PeerChallenge",
    "Policy",
    "SetupKey",
    "Store",
    "User",
    "aware",
    "hash_password",
    "hash_password_async",
    "hash_secret",
    "new_id",
    "new_secret",
    "normalise_url",
    "sqlite_url",
    "utcnow",
    "verify_password",
    "verify_password_async",
]
