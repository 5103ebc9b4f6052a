"""ORM models of the management store (SQLAlchemy 2 declarative, async-friendly).

Every table hangs off one declarative `Base`, so one migration (and one `create_all`)
covers the core tables here and the issuer's tables in `management/idp/models.py`.

Design choices, written down because other modules rely on them:
- ids are random strings (`new_id()`), except audit events, which use an increasing
  integer so `GET /api/events?since=<id>` and `--follow` can page without gaps.
- secrets (peer credentials, setup keys, admin tokens, client secrets) are random and
  high-entropy, so they are stored as SHA-256 digests (`hash_secret`); passwords, which
  people choose, use argon2 (`passwords.py`).
- policy rules are kept as a JSON list on the policy row: a rule is always read and
  written together with its policy, and the rule shape is validated by the API layer.
- rules and setup keys refer to groups; rules by group *name* (as people write them),
  setup keys' auto-groups by group *id* (so a rename keeps working).
- timestamps are UTC. SQLite hands back naive datetimes; `aware()` normalises them.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """The one declarative base of meshmgmt (core and issuer tables).

    Every `Mapped[datetime]` column is stored with its zone (all are UTC, see `aware`);
    declaring that here once keeps a new table from storing naive times by accident.
    """

    type_annotation_map = {datetime: DateTime(timezone=True)}


def new_id() -> str:
    return secrets.token_hex(8)


# The random string primary key of every table but `events` and `meta` (see "ids" above).
RowId = Annotated[str, mapped_column(String(32), primary_key=True, default=new_id)]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# When a row was inserted (UTC), filled in by the ORM.
Created = Annotated[datetime, mapped_column(default=utcnow)]


def aware(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored datetime is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)


def hash_secret(secret: str) -> str:
    """Digest of a random, high-entropy secret (not for passwords people choose)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


group_peers = Table(
    "group_peers",
    Base.metadata,
    Column("group_id", String(32), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
    Column("peer_id", String(32), ForeignKey("peers.id", ondelete="CASCADE"), primary_key=True),
)

group_users = Table(
    "group_users",
    Base.metadata,
    Column("group_id", String(32), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", String(32), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)


class User(Base):
    """A person or a service (machine) identity of the embedded issuer."""

    __tablename__ = "users"

    id: Mapped[RowId]
    email: Mapped[str] = mapped_column(String(320), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    role: Mapped[str] = mapped_column(String(16), default="user")  # admin | user
    is_service: Mapped[bool] = mapped_column(Boolean, default=False)
    client_id: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    client_secret_hash: Mapped[str | None] = mapped_column(String(128), nullable=True)
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[Created]

    groups: Mapped[list[Group]] = relationship(
        secondary=group_users, back_populates="users", lazy="selectin"
    )


class Group(Base):
    """A named set of peers and users; policy rules name groups as sources/destinations."""

    __tablename__ = "groups"

    id: Mapped[RowId]
    name: Mapped[str] = mapped_column(String(100), unique=True, index=True)
    created: Mapped[Created]

    peers: Mapped[list[Peer]] = relationship(
        secondary=group_peers, back_populates="groups", lazy="selectin"
    )
    users: Mapped[list[User]] = relationship(
        secondary=group_users, back_populates="groups", lazy="selectin"
    )


class Peer(Base):
    """A registered machine. `flags` is what it advertises; `ssh_enabled` is the admin toggle."""

    __tablename__ = "peers"

    id: Mapped[RowId]
    name: Mapped[str] = mapped_column(String(63), unique=True, index=True)
    mesh_ip: Mapped[str] = mapped_column(String(45), unique=True)
    wg_public_key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    ssh_host_key: Mapped[str] = mapped_column(Text, default="")
    hostname: Mapped[str] = mapped_column(String(255), default="")
    flags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    version: Mapped[str] = mapped_column(String(64), default="")
    endpoints: Mapped[list[str]] = mapped_column(JSON, default=list)
    credential_hash: Mapped[str] = mapped_column(String(128))
    ssh_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    setup_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created: Mapped[Created]
    last_seen: Mapped[datetime | None]
    # Until when an admin allows one re-registration of this WireGuard key without the
    # current credential (`meshmgmt peers approve-rekey`); cleared when it is used.
    rekey_approved_until: Mapped[datetime | None]

    groups: Mapped[list[Group]] = relationship(
        secondary=group_peers, back_populates="peers", lazy="selectin"
    )


class PeerChallenge(Base):
    """A single-use registration challenge (docs/protocol.md), bound to the WireGuard key
    it was asked for and to management's box key of the time; deleted when answered.
    Stored, not kept in memory, so any replica can check the answer. `id` is the digest of
    the challenge (the challenge itself is not a secret, but nothing needs it back)."""

    __tablename__ = "peer_challenges"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    wg_public_key: Mapped[str] = mapped_column(String(64))
    box_key: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(index=True)


class SetupKey(Base):
    """A registration key: one-off or reusable, optional expiry and usage limit, revocable."""

    __tablename__ = "setup_keys"

    id: Mapped[RowId]
    name: Mapped[str] = mapped_column(String(100), default="")
    key_hash: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    reusable: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[datetime | None]
    usage_limit: Mapped[int] = mapped_column(Integer, default=0)  # 0 = unlimited (reusable)
    used_count: Mapped[int] = mapped_column(Integer, default=0)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    auto_groups: Mapped[list[str]] = mapped_column(JSON, default=list)  # group ids
    created: Mapped[Created]
    last_used: Mapped[datetime | None]


class Policy(Base):
    """An access policy: a list of rules (JSON, shape checked by the API), on or off."""

    __tablename__ = "policies"

    id: Mapped[RowId]
    name: Mapped[str] = mapped_column(String(100), unique=True, index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    rules: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created: Mapped[Created]


class Event(Base):
    """An audit event: sent by a peer (sessions, execs, forwards) or made by management."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    type: Mapped[str] = mapped_column(String(64), index=True)
    peer_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    time: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AdminToken(Base):
    """The admin API token written by `meshmgmt init` (replaced by `meshmgmt admin-token
    rotate`); only the digest is kept. Refused from `expires_at` on."""

    __tablename__ = "admin_tokens"

    id: Mapped[RowId]
    token_hash: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(100), default="admin")
    created: Mapped[Created]
    expires_at: Mapped[datetime]


class Meta(Base):
    """Small integer settings; the row `serial` is the global network-map serial."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class Subsystem(Base):
    """An SSH subsystem a peer serves (`powershell` → `pwsh -sshs -NoLogo -NoProfile`),
    set for one peer or for every peer of a group; it reaches peers in the map's
    `ssh.subsystems`. Exactly one of peer_id / group_id is set; a peer's own entry
    overrides its groups' (management/netmap.py `subsystems_for`)."""

    __tablename__ = "subsystems"
    __table_args__ = (
        UniqueConstraint("peer_id", "name", name="uq_subsystems_peer_name"),
        UniqueConstraint("group_id", "name", name="uq_subsystems_group_name"),
    )

    id: Mapped[RowId]
    peer_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("peers.id", ondelete="CASCADE"), nullable=True, index=True)
    group_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("groups.id", ondelete="CASCADE"), nullable=True, index=True)
    name: Mapped[str] = mapped_column(String(64))
    command: Mapped[str] = mapped_column(Text)
    created: Mapped[Created]
