"""Read the whole mesh into a `MeshState` in one transaction (consistent snapshot)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ..state import GroupRecord, MeshState, PeerRecord, PolicyRecord, RuleRecord, SubsystemRecord, UserRecord
from .models import Group, Meta, Peer, Policy, Subsystem, User, group_peers, group_users

DEFAULT_DNS_DOMAIN = "mesh.internal"


_PEER_COLUMNS = (Peer.id, Peer.name, Peer.mesh_ip, Peer.wg_public_key, Peer.ssh_host_key, Peer.endpoints,
                 Peer.flags, Peer.ssh_enabled, Peer.version)


def peer_record(p: Any, dns_domain: str = DEFAULT_DNS_DOMAIN) -> PeerRecord:
    """From a Peer row (or any object with the same attributes)."""
    flags = p.flags or {}
    return PeerRecord(
        id=p.id,
        name=p.name,
        mesh_ip=p.mesh_ip,
        fqdn=f"{p.name}.{dns_domain}",
        wg_public_key=p.wg_public_key,
        ssh_host_key=p.ssh_host_key or "",
        endpoints=tuple(p.endpoints or ()),
        allow_server_ssh=bool(flags.get("allow_server_ssh", False)),
        enable_ssh_root=bool(flags.get("enable_ssh_root", False)),
        ssh_enabled=bool(p.ssh_enabled),
        version=p.version or "",
    )


async def load_state(s: AsyncSession, network: str = "", dns_domain: str = "") -> MeshState:
    dns_domain = dns_domain or DEFAULT_DNS_DOMAIN
    # No `s.begin()` block: ending it would hand the connection back to the pool inside
    # this task, and a cancel landing there (a sync stream or the hub loop stopped at
    # shutdown) cuts the pool's reset short ("Exception during reset or similar"). The
    # session's first statement begins the one transaction all reads share, and the
    # session's own close, which runs to its end when cancelled, ends it.
    serial = (await s.execute(select(Meta.value).where(Meta.key == "serial"))).scalar() or 0
    peers = (await s.execute(select(*_PEER_COLUMNS))).all()  # rows, not ORM objects: no relationships
    users = (await s.execute(select(User.id, User.email, User.name, User.role, User.is_service, User.blocked))).all()
    groups = (await s.execute(select(Group.id, Group.name))).all()
    gp = (await s.execute(select(group_peers.c.group_id, group_peers.c.peer_id))).all()
    gu = (await s.execute(select(group_users.c.group_id, group_users.c.user_id))).all()
    policies = (await s.execute(select(Policy.id, Policy.name, Policy.enabled, Policy.rules))).all()
    subsystems = (await s.execute(select(Subsystem.name, Subsystem.command, Subsystem.peer_id,
                                         Subsystem.group_id))).all()
    members_p: dict[str, set[str]] = {}
    members_u: dict[str, set[str]] = {}
    for gid, pid in gp:
        members_p.setdefault(gid, set()).add(pid)
    for gid, uid in gu:
        members_u.setdefault(gid, set()).add(uid)
    return MeshState(
        serial=int(serial),
        network=network,
        peers=tuple(sorted((peer_record(p, dns_domain) for p in peers), key=lambda p: (p.name, p.id))),
        users=tuple(
            sorted(
                (UserRecord(id=u.id, email=u.email, name=u.name or "", role=u.role,
                            is_service=bool(u.is_service), blocked=bool(u.blocked)) for u in users),
                key=lambda u: u.email,
            )
        ),
        groups=tuple(
            sorted(
                (GroupRecord(id=g.id, name=g.name, peer_ids=frozenset(members_p.get(g.id, ())),
                             user_ids=frozenset(members_u.get(g.id, ()))) for g in groups),
                key=lambda g: g.name,
            )
        ),
        policies=tuple(
            sorted(
                (PolicyRecord(id=p.id, name=p.name, enabled=bool(p.enabled),
                              rules=tuple(RuleRecord.from_dict(r) for r in (p.rules or ()))) for p in policies),
                key=lambda p: (p.name, p.id),
            )
        ),
        subsystems=tuple(
            sorted(
                (SubsystemRecord(name=x.name, command=x.command, peer_id=x.peer_id or "",
                                 group_id=x.group_id or "") for x in subsystems),
                key=lambda x: (x.peer_id, x.group_id, x.name),
            )
        ),
    )
