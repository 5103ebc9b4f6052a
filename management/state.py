"""MeshState: an immutable snapshot of everything network maps are computed from.

`Store.load_state()` builds it from the database; `management/netmap.py` computes maps
and SSH grants from it with pure functions. Records are plain frozen dataclasses (no ORM
objects), so the pure code can be tested with hand-written tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class PeerRecord:
    id: str
    name: str
    mesh_ip: str
    fqdn: str = ""
    wg_public_key: str = ""
    ssh_host_key: str = ""
    endpoints: tuple[str, ...] = ()
    allow_server_ssh: bool = False  # advertised by the peer (--allow-server-ssh)
    enable_ssh_root: bool = False  # advertised by the peer (--enable-ssh-root)
    ssh_enabled: bool = False  # the admin toggle
    version: str = ""


@dataclass(frozen=True)
class UserRecord:
    id: str
    email: str
    name: str = ""
    role: str = "user"
    is_service: bool = False
    blocked: bool = False


@dataclass(frozen=True)
class GroupRecord:
    id: str
    name: str
    peer_ids: frozenset[str] = frozenset()
    user_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RuleRecord:
    """One policy rule. sources: group names or "user:<email>"; destinations: group names."""

    sources: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    protocol: str = "tcp"  # tcp | udp | icmp | all | ssh
    ports: tuple[str, ...] = ()
    bidirectional: bool = False
    local_users: tuple[str, ...] = ()
    allow_root: bool = False
    accept_env: tuple[str, ...] | None = None   # AcceptEnv patterns; None: the peer's own

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuleRecord:
        return cls(
            sources=tuple(d.get("sources", ())),
            destinations=tuple(d.get("destinations", ())),
            protocol=d.get("protocol", "tcp"),
            ports=tuple(d.get("ports", ())),
            bidirectional=bool(d.get("bidirectional", False)),
            local_users=tuple(d.get("local_users", ())),
            allow_root=bool(d.get("allow_root", False)),
            accept_env=tuple(d["accept_env"]) if d.get("accept_env") is not None else None,
        )


@dataclass(frozen=True)
class PolicyRecord:
    id: str
    name: str
    enabled: bool = True
    rules: tuple[RuleRecord, ...] = ()


@dataclass(frozen=True)
class SubsystemRecord:
    """An SSH subsystem set by an admin for one peer (peer_id) or a group (group_id)."""

    name: str
    command: str
    peer_id: str = ""
    group_id: str = ""


@dataclass(frozen=True)
class MeshState:
    """Peers, users, groups and policies at one serial, plus the issuer's facts.

    issuer and jwks are filled by the app (the issuer owns them), not by the store.
    """

    serial: int = 0
    network: str = ""
    peers: tuple[PeerRecord, ...] = ()
    users: tuple[UserRecord, ...] = ()
    groups: tuple[GroupRecord, ...] = ()
    policies: tuple[PolicyRecord, ...] = ()
    subsystems: tuple[SubsystemRecord, ...] = ()
    issuer: str = ""
    jwks: dict[str, Any] = field(default_factory=dict)
    permit_open: tuple[str, ...] = ()  # from the app's settings (--ssh-permit-open), like issuer
    permit_listen: tuple[str, ...] = ()  # likewise (--ssh-permit-listen)

    @cached_property
    def peers_by_id(self) -> dict[str, PeerRecord]:
        return {p.id: p for p in self.peers}

    @cached_property
    def users_by_id(self) -> dict[str, UserRecord]:
        return {u.id: u for u in self.users}

    @cached_property
    def users_by_email(self) -> dict[str, UserRecord]:
        return {u.email.lower(): u for u in self.users}

    @cached_property
    def groups_by_name(self) -> dict[str, GroupRecord]:
        return {g.name: g for g in self.groups}

    def groups_of_user(self, user_id: str) -> tuple[str, ...]:
        return tuple(sorted(g.name for g in self.groups if user_id in g.user_ids))
