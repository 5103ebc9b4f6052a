"""Policy → per-peer network map, and who may SSH where. Pure functions over `MeshState`.

Public functions (the issuer's token exchange and the API use these):

    compute_map(state, peer_id) -> NetworkMap | None     # None: no such peer (deleted)
    ssh_access(state, user_email, user_groups, peer_id) -> SSHGrant | None
    reachable_peers(state, user_email, user_groups=None) -> tuple[PeerInfo, ...]
    find_peer(state, ref) -> PeerRecord | None           # by id, name, FQDN or mesh IP
    map_fingerprint(netmap) -> str                        # content without the serial
    subsystems_for(state, peer_id) -> dict[str, str]      # admin-set SSH subsystems

`state` comes from `await store.load_state()` (management/store/snapshot.py); the app
fills in `issuer` and `jwks` with `dataclasses.replace` before computing maps.

Semantics (kept small on purpose; docs/management.md repeats them for operators):

- Groups hold peers and users. A rule's `sources` are group names or `user:<email>`;
  its `destinations` are group names. Unknown groups, peers and users are ignored.
- Source peers = peers of the source groups; if a rule names no source group at all
  (only `user:` entries), every peer is a source (the SSH identity check then gates).
  Destination peers = peers of the destination groups. A peer is never its own source.
- A peer in the sources sees the destinations and vice versa (WireGuard needs both
  sides). Inbound firewall rules go to destinations only, from the source peers'
  mesh IPs (/32); `bidirectional` adds the mirror rule (destinations → sources).
- Protocols tcp, udp, icmp, all; `ssh` is tcp port 22 plus "this is an SSH rule". Ports
  only matter for tcp/udp; no ports means every port.
- Disabled policies count for nothing. Identical (protocol, ports) rules are merged.
- A peer's SSH section is enabled iff the peer advertises allow_server_ssh AND (an
  `ssh` rule targets it, OR the admin toggle `ssh_enabled` is on and some rule admits
  TCP 22 to it).
- Wherever a rule admits TCP 22 to a peer whose SSH section is enabled, TCP 22022 is
  admitted from the same sources (the port the firewall sees after the 22 → 22022 DNAT).
- SSH access rules come from the rules that grant SSH to the peer: `ssh` rules, and
  rules admitting TCP 22 while the admin toggle is on. Each gives sources = the source
  peers' mesh IPs, identities = emails of the (non-blocked) users in the source groups
  plus the `user:` entries, local_users = the rule's list (default ["localpart"]) with
  "root" kept only if `allow_root` (and added when `allow_root` is set). A rule that
  names no user gives nobody SSH access (deny by default). A rule's `accept_env`
  (AcceptEnv patterns) travels with its access rule; absent, the peer's default applies.
- Output is deterministic: peers sorted by name, rules and addresses sorted.
- The map's serial is the store's global serial, which only grows (it lives in the
  database, so it survives restarts and is shared by replicas).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from meshsshd.netmap import (
    SSH_PORT,
    AccessRule,
    FirewallRule,
    NetworkMap,
    PeerInfo,
    SSHSection,
    parse_port_range,
)

from .state import GroupRecord, MeshState, PeerRecord, RuleRecord

USER_PREFIX = "user:"
DEFAULT_LOCAL_USERS = ("localpart",)
USER_CLAIM = "email"
RULE_PROTOCOLS = ("tcp", "udp", "icmp", "all", "ssh")

__all__ = [
    "subsystems_for",
    "SSHGrant",
    "compute_map",
    "find_peer",
    "encode_map",
    "map_fingerprint",
    "reachable_peers",
    "ssh_access",
    "admits_port",
]


@dataclass(frozen=True)
class SSHGrant:
    """What one identity may do on one peer: log in as `local_users` from `sources`."""

    peer_id: str
    peer_name: str
    local_users: tuple[str, ...]
    sources: tuple[str, ...]  # mesh IPs (/32) the connection may come from


# --- small pure helpers ---------------------------------------------------------------


def admits_port(protocol: str, ports: Iterable[str], port: int, proto: str = "tcp") -> bool:
    """Does a rule with (protocol, ports) admit `proto`/`port`?"""
    if protocol == "all":
        return True
    if protocol == "ssh":
        return proto == "tcp" and port == 22
    if protocol != proto:
        return False
    ports = tuple(ports)
    if not ports:
        return True
    for spec in ports:
        lo, hi = parse_port_range(spec)
        if lo <= port <= hi:
            return True
    return False


def _fw_shape(rule: RuleRecord) -> tuple[str, tuple[str, ...]]:
    """The firewall (protocol, ports) a rule becomes."""
    if rule.protocol == "ssh":
        return "tcp", ("22",)
    if rule.protocol in ("tcp", "udp"):
        return rule.protocol, tuple(sorted(set(rule.ports), key=lambda p: parse_port_range(p)))
    return rule.protocol, ()


@lru_cache(maxsize=1 << 18)
def _ip_key(ip: str) -> tuple[int, int]:
    """Numeric sort key of "a.b.c.d" or "a.b.c.d/32" (cached: maps sort the same IPs often)."""
    addr = ipaddress.ip_address(ip.split("/")[0])
    return addr.version, int(addr)


def _local_users(rule: RuleRecord) -> tuple[str, ...]:
    users = [u for u in (rule.local_users or DEFAULT_LOCAL_USERS) if u != "root"]
    if rule.allow_root:
        users.append("root")
    return tuple(dict.fromkeys(users))


# --- the index: everything per state that every peer's map needs ---------------------


@dataclass(frozen=True)
class _Rule:
    """A rule of an enabled policy with its group names resolved (one direction)."""

    rule: RuleRecord
    sources: frozenset[str]  # peer ids
    targets: frozenset[str]  # peer ids
    source_groups: tuple[str, ...]  # group names whose users count as identities
    explicit_users: tuple[str, ...]  # from user:<email>
    identities: tuple[str, ...]  # resolved emails, sorted


@dataclass
class _Index:
    state: MeshState
    inbound: dict[str, list[_Rule]] = field(default_factory=dict)  # peer → rules targeting it
    # peer → the peer sets it sees (unioned lazily per map: cheaper than per-peer sets)
    visible: dict[str, list[frozenset[str]]] = field(default_factory=dict)
    _ssh_enabled: dict[str, bool] = field(default_factory=dict)
    _cidrs: dict[int, tuple[str, ...]] = field(default_factory=dict)
    _infos: dict[str, PeerInfo] = field(default_factory=dict)
    _access: dict[tuple[int, str], AccessRule | None] = field(default_factory=dict)

    def info(self, p: PeerRecord) -> PeerInfo:
        got = self._infos.get(p.id)
        if got is None:
            got = _peer_info(self, p)
            self._infos[p.id] = got
        return got

    def access_rule(self, r: _Rule, peer_id: str) -> AccessRule | None:
        key = (id(r), peer_id if peer_id in r.sources else "")  # a source never admits itself
        if key not in self._access:
            sources = self.cidrs(r.sources, peer_id)
            self._access[key] = (
                AccessRule(sources=sources, identities=r.identities, local_users=_local_users(r.rule),
                           accept_env=r.rule.accept_env)
                if sources else None
            )
        return self._access[key]

    def cidrs(self, peers: frozenset[str], exclude: str) -> tuple[str, ...]:
        key = id(peers)
        all_ = self._cidrs.get(key)
        if all_ is None:
            by_id = self.state.peers_by_id
            all_ = tuple(
                f"{ip}/32" if ":" not in ip else f"{ip}/128"
                for ip in sorted((by_id[p].mesh_ip for p in peers), key=_ip_key)
            )
            self._cidrs[key] = all_
        if exclude in peers:
            own = self.state.peers_by_id[exclude].mesh_ip
            return tuple(c for c in all_ if c.split("/")[0] != own)
        return all_

    def ssh_enabled(self, peer_id: str) -> bool:
        cached = self._ssh_enabled.get(peer_id)
        if cached is None:
            cached = self._compute_ssh_enabled(peer_id)
            self._ssh_enabled[peer_id] = cached
        return cached

    def _compute_ssh_enabled(self, peer_id: str) -> bool:
        peer = self.state.peers_by_id.get(peer_id)
        if peer is None or not peer.allow_server_ssh:
            return False
        for r in self.inbound.get(peer_id, ()):
            if not (r.sources - {peer_id}):
                continue
            if r.rule.protocol == "ssh":
                return True
            if peer.ssh_enabled and admits_port(r.rule.protocol, r.rule.ports, 22):
                return True
        return False

    def grants_ssh(self, r: _Rule, peer: PeerRecord) -> bool:
        """Does this inbound rule grant SSH logins (not only packets) to `peer`?"""
        if r.rule.protocol == "ssh":
            return True
        return peer.ssh_enabled and admits_port(r.rule.protocol, r.rule.ports, 22)


def _group_members(groups: dict[str, GroupRecord], names: Iterable[str], peers: dict) -> frozenset[str]:
    out: set[str] = set()
    for n in names:
        g = groups.get(n)
        if g is not None:
            out |= {p for p in g.peer_ids if p in peers}
    return frozenset(out)


def build_index(state: MeshState) -> _Index:
    idx = _Index(state)
    groups = state.groups_by_name
    peers = state.peers_by_id
    users = state.users_by_id
    all_peers = frozenset(peers)
    members_cache: dict[tuple[str, ...], frozenset[str]] = {}

    def members(names: tuple[str, ...]) -> frozenset[str]:
        key = tuple(sorted(set(names)))
        got = members_cache.get(key)
        if got is None:
            got = _group_members(groups, key, peers)
            members_cache[key] = got
        return got

    def identities(group_names: tuple[str, ...], explicit: tuple[str, ...]) -> tuple[str, ...]:
        emails: set[str] = set()
        for n in group_names:
            g = groups.get(n)
            if g is None:
                continue
            for uid in g.user_ids:
                u = users.get(uid)
                if u is not None and not u.blocked:
                    emails.add(u.email.lower())
        for e in explicit:
            u = state.users_by_email.get(e)
            if u is None or not u.blocked:
                emails.add(e)
        return tuple(sorted(emails))

    for policy in state.policies:
        if not policy.enabled:
            continue
        for rule in policy.rules:
            src_groups = tuple(s for s in rule.sources if not s.startswith(USER_PREFIX))
            explicit = tuple(sorted({s[len(USER_PREFIX):].lower() for s in rule.sources if s.startswith(USER_PREFIX)}))
            src = members(src_groups) if src_groups else (all_peers if explicit else frozenset())
            dst = members(rule.destinations)
            if not src or not dst:
                continue
            directions = [_Rule(rule, src, dst, src_groups, explicit, identities(src_groups, explicit))]
            if rule.bidirectional:
                dst_groups = tuple(rule.destinations)
                directions.append(_Rule(rule, dst, src, dst_groups, (), identities(dst_groups, ())))
            for d in directions:
                for p in d.targets:
                    idx.inbound.setdefault(p, []).append(d)
            # Both sides of a rule see each other, whichever way traffic may start.
            for p in src:
                idx.visible.setdefault(p, []).append(dst)
            for p in dst:
                idx.visible.setdefault(p, []).append(src)
    return idx


def _index(state: MeshState) -> _Index:
    cached = state.__dict__.get("_netmap_index")
    if cached is None:
        cached = build_index(state)
        object.__setattr__(state, "_netmap_index", cached)  # per-snapshot memo
    return cached


# --- maps -------------------------------------------------------------------------------


def _peer_info(idx: _Index, p: PeerRecord, local_users: tuple[str, ...] = ()) -> PeerInfo:
    return PeerInfo(
        id=p.id,
        name=p.name,
        fqdn=p.fqdn,
        mesh_ip=p.mesh_ip,
        wg_public_key=p.wg_public_key,
        endpoints=tuple(p.endpoints),
        ssh_host_keys=(p.ssh_host_key,) if p.ssh_host_key else (),
        ssh_enabled=idx.ssh_enabled(p.id),
        local_users=local_users,
    )


def _firewall(idx: _Index, peer: PeerRecord, ssh_on: bool) -> tuple[FirewallRule, ...]:
    buckets: dict[tuple[str, tuple[str, ...]], set[str]] = {}
    for r in idx.inbound.get(peer.id, ()):
        sources = idx.cidrs(r.sources, peer.id)
        if not sources:
            continue
        shape = _fw_shape(r.rule)
        buckets.setdefault(shape, set()).update(sources)
        if ssh_on and admits_port(shape[0], shape[1], 22) and not admits_port(shape[0], shape[1], SSH_PORT):
            buckets.setdefault(("tcp", (str(SSH_PORT),)), set()).update(sources)
    rules = [
        FirewallRule(sources=tuple(sorted(srcs, key=_ip_key)), protocol=proto, ports=ports)
        for (proto, ports), srcs in buckets.items()
    ]
    rules.sort(key=lambda f: (f.protocol, [parse_port_range(p) for p in f.ports], [_ip_key(s) for s in f.sources]))
    return tuple(rules)


def _access(idx: _Index, peer: PeerRecord) -> tuple[AccessRule, ...]:
    out: set[AccessRule] = set()
    for r in idx.inbound.get(peer.id, ()):
        if not idx.grants_ssh(r, peer) or not r.identities:
            continue
        rule = idx.access_rule(r, peer.id)
        if rule is not None:
            out.add(rule)
    return tuple(sorted(out, key=lambda a: ([_ip_key(s) for s in a.sources], a.identities, a.local_users,
                                            a.accept_env or ())))


def serves_ssh(state: MeshState, peer_id: str) -> bool:
    """Whether the peer's map has its SSH section on: the one answer its map, the token
    exchange and `meshmgmt peers list` give."""
    return _index(state).ssh_enabled(peer_id)


def compute_map(state: MeshState, peer_id: str) -> NetworkMap | None:
    """The network map of one peer, or None when the peer does not exist (deleted)."""
    idx = _index(state)
    peer = state.peers_by_id.get(peer_id)
    if peer is None:
        return None
    ssh_on = idx.ssh_enabled(peer_id)
    by_id = state.peers_by_id
    seen: set[str] = set().union(*idx.visible.get(peer_id, ()))
    seen.discard(peer_id)
    visible = sorted((by_id[p] for p in seen), key=lambda p: (p.name, p.id))
    ssh = SSHSection(
        enabled=ssh_on,
        issuer=state.issuer,
        audience=(peer.id,),
        jwks=dict(state.jwks) if ssh_on else {},
        user_claim=USER_CLAIM,
        access=_access(idx, peer) if ssh_on else (),
        subsystems=subsystems_for(state, peer_id) if ssh_on else {},
        permit_open=state.permit_open if ssh_on else (),
        permit_listen=state.permit_listen if ssh_on else (),
    )
    return NetworkMap(
        serial=state.serial,
        peer=idx.info(peer),
        network=state.network,
        peers=tuple(idx.info(p) for p in visible),
        firewall_rules=_firewall(idx, peer, ssh_on),
        ssh=ssh,
    )


def subsystems_for(state: MeshState, peer_id: str) -> dict[str, str]:
    """The subsystems management sets for a peer: its groups' entries (groups in name
    order, a later group winning a name clash), then the peer's own, which win."""
    if not state.subsystems:
        return {}
    out: dict[str, str] = {}
    group_ids = {g.id: g.name for g in state.groups if peer_id in g.peer_ids}
    for rec in sorted((r for r in state.subsystems if r.group_id in group_ids),
                      key=lambda r: (group_ids[r.group_id], r.name)):
        out[rec.name] = rec.command
    for rec in state.subsystems:
        if rec.peer_id == peer_id:
            out[rec.name] = rec.command
    return dict(sorted(out.items()))


def map_fingerprint(netmap: NetworkMap) -> str:
    """A digest of the map's content without its serial: equal ⇔ nothing to resend."""
    return encode_map(netmap)[0]


def encode_map(netmap: NetworkMap) -> tuple[str, str]:
    """(fingerprint, sync message text) with one JSON encoding of the map.

    The message is `{"type": "netmap", "netmap": {...}}`; the fingerprint covers
    everything in the map except its serial.
    """
    doc = netmap.to_dict()
    serial = doc.pop("serial")
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    fingerprint = hashlib.sha256(body.encode()).hexdigest()
    # body is '{...}': splice the serial in after its brace, then close the envelope.
    return fingerprint, '{"type":"netmap","netmap":{"serial":' + str(int(serial)) + "," + body[1:] + "}"


# --- who may SSH where --------------------------------------------------------------------


def find_peer(state: MeshState, ref: str) -> PeerRecord | None:
    """A peer by id, name, FQDN or mesh IP (how people and the client name targets)."""
    ref = ref.strip().lower().rstrip(".")
    by_id = state.peers_by_id.get(ref)
    if by_id is not None:
        return by_id
    for p in state.peers:
        if ref in (p.name.lower(), p.fqdn.lower(), p.mesh_ip):
            return p
    return None


def ssh_access(
    state: MeshState,
    user_email: str,
    user_groups: Iterable[str] | None,
    peer_id: str,
) -> SSHGrant | None:
    """May this identity log in to this peer, and as whom? None = no policy allows it.

    `user_groups` are group names to count the identity in besides its memberships in
    the store (e.g. from an external IdP); pass None or () for store membership only.
    A blocked user gets nothing.
    """
    idx = _index(state)
    peer = state.peers_by_id.get(peer_id)
    if peer is None or not idx.ssh_enabled(peer_id):
        return None
    email = user_email.strip().lower()
    user = state.users_by_email.get(email)
    if user is not None and user.blocked:
        return None
    extra_groups = set(user_groups or ())
    local_users: dict[str, None] = {}
    sources: set[str] = set()
    for r in idx.inbound.get(peer_id, ()):
        if not idx.grants_ssh(r, peer):
            continue
        if email not in r.identities and not (extra_groups & set(r.source_groups)):
            continue
        cidrs = idx.cidrs(r.sources, peer_id)
        if not cidrs:
            continue
        sources.update(cidrs)
        for u in _local_users(r.rule):
            local_users.setdefault(u, None)
    if not local_users:
        return None
    return SSHGrant(
        peer_id=peer.id,
        peer_name=peer.name,
        local_users=tuple(local_users),
        sources=tuple(sorted(sources, key=_ip_key)),
    )


def reachable_peers(
    state: MeshState, user_email: str, user_groups: Iterable[str] | None = None
) -> tuple[PeerInfo, ...]:
    """The peers this identity may SSH to, each with the local users it may use there."""
    idx = _index(state)
    groups = tuple(user_groups or ())
    out = []
    for p in state.peers:
        grant = ssh_access(state, user_email, groups, p.id)
        if grant is not None:
            out.append(_peer_info(idx, p, grant.local_users))
    return tuple(out)
