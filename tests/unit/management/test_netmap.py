"""Network-map computation: table-driven cases over hand-written MeshState snapshots."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshmgmt.netmap import compute_map, find_peer, map_fingerprint, reachable_peers, ssh_access
from meshmgmt.state import GroupRecord, MeshState, PeerRecord, PolicyRecord, RuleRecord, UserRecord
from meshsshd.netmap import NetworkMap

JWKS = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "abc", "kid": "k1"}]}


def peer(pid: str, ip: str, *, ssh: bool = True, toggle: bool = False) -> PeerRecord:
    return PeerRecord(id=pid, name=pid, mesh_ip=ip, fqdn=f"{pid}.mesh.internal", wg_public_key=f"wg-{pid}",
                      ssh_host_key=f"ssh-ed25519 KEY{pid}", allow_server_ssh=ssh, ssh_enabled=toggle)


USERS = (
    UserRecord(id="u-alice", email="alice@example.com"),
    UserRecord(id="u-bob", email="bob@example.com"),
    UserRecord(id="u-eve", email="eve@example.com", blocked=True),
)


def state(peers, groups, rules=(), *, enabled=True, serial=7, policies=None) -> MeshState:
    pols = policies if policies is not None else (PolicyRecord(id="pol1", name="p1", enabled=enabled, rules=tuple(rules)),)
    return MeshState(serial=serial, network="100.64.0.0/10", peers=tuple(peers), users=USERS,
                     groups=tuple(GroupRecord(id=n, name=n, peer_ids=frozenset(ps), user_ids=frozenset(us))
                                  for n, ps, us in groups),
                     policies=pols, issuer="https://mgmt.example", jwks=JWKS)


LAPTOP = peer("laptop", "100.64.0.2", ssh=False)
LAPTOP2 = peer("laptop2", "100.64.0.10", ssh=False)
DB = peer("db", "100.64.0.3")
WEB = peer("web", "100.64.0.4", toggle=True)
BASE_GROUPS = (
    ("admins", {"laptop", "laptop2"}, {"u-alice", "u-bob", "u-eve"}),
    ("servers", {"db", "web"}, set()),
)


def fw(netmap: NetworkMap) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    return [(r.protocol, r.ports, r.sources) for r in netmap.firewall_rules]


def m(st: MeshState, pid: str) -> NetworkMap:
    out = compute_map(st, pid)
    assert out is not None
    return out


ADMIN_SOURCES = ("100.64.0.2/32", "100.64.0.10/32")


@pytest.mark.parametrize(
    ("rule", "target", "expected"),
    [
        pytest.param(RuleRecord(("admins",), ("servers",), "tcp", ("80",)), "db",
                     [("tcp", ("80",), ADMIN_SOURCES)], id="tcp-port"),
        pytest.param(RuleRecord(("admins",), ("servers",), "tcp", ("8000-8080", "443")), "db",
                     [("tcp", ("443", "8000-8080"), ADMIN_SOURCES)], id="port-range-sorted"),
        pytest.param(RuleRecord(("admins",), ("servers",), "udp", ()), "db",
                     [("udp", (), ADMIN_SOURCES)], id="udp-all-ports"),
        pytest.param(RuleRecord(("admins",), ("servers",), "icmp", ()), "db",
                     [("icmp", (), ADMIN_SOURCES)], id="icmp"),
        pytest.param(RuleRecord(("admins",), ("servers",), "ssh", ()), "db",
                     [("tcp", ("22",), ADMIN_SOURCES), ("tcp", ("22022",), ADMIN_SOURCES)], id="ssh-adds-22022"),
        pytest.param(RuleRecord(("admins",), ("servers",), "tcp", ("22",)), "db",
                     [("tcp", ("22",), ADMIN_SOURCES)], id="tcp22-no-toggle-no-22022"),
        pytest.param(RuleRecord(("admins",), ("servers",), "tcp", ("22",)), "web",
                     [("tcp", ("22",), ADMIN_SOURCES), ("tcp", ("22022",), ADMIN_SOURCES)], id="tcp22-toggle-22022"),
        pytest.param(RuleRecord(("admins",), ("servers",), "tcp", ("20-30",)), "web",
                     [("tcp", ("20-30",), ADMIN_SOURCES), ("tcp", ("22022",), ADMIN_SOURCES)], id="range-covering-22"),
        pytest.param(RuleRecord(("admins",), ("servers",), "tcp", ()), "web",
                     [("tcp", (), ADMIN_SOURCES)], id="all-tcp-covers-22022-already"),
        pytest.param(RuleRecord(("admins",), ("servers",), "all", ()), "web",
                     [("all", (), ADMIN_SOURCES)], id="all-protocols"),
        pytest.param(RuleRecord(("admins",), ("servers",), "tcp", ("22000-22100",)), "web",
                     [("tcp", ("22000-22100",), ADMIN_SOURCES)], id="range-not-22"),
        pytest.param(RuleRecord(("admins",), ("servers",), "tcp", ("80",)), "laptop",
                     [], id="source-side-gets-no-inbound"),
        pytest.param(RuleRecord(("admins",), ("servers",), "tcp", ("80",), bidirectional=True), "laptop",
                     [("tcp", ("80",), ("100.64.0.3/32", "100.64.0.4/32"))], id="bidirectional-mirror"),
        pytest.param(RuleRecord(("nosuch",), ("servers",), "tcp", ("80",)), "db", [], id="unknown-group"),
    ],
)
def test_firewall_rules(rule: RuleRecord, target: str, expected: list) -> None:
    st = state((LAPTOP, LAPTOP2, DB, WEB), BASE_GROUPS, (rule,))
    assert fw(m(st, target)) == expected


def test_disabled_policy_counts_for_nothing() -> None:
    st = state((LAPTOP, DB), BASE_GROUPS, (RuleRecord(("admins",), ("servers",), "ssh"),), enabled=False)
    netmap = m(st, "db")
    assert netmap.firewall_rules == () and netmap.peers == () and not netmap.ssh.enabled


def test_deleted_peer_has_no_map_and_vanishes_from_others() -> None:
    # "laptop2" is still a group member but no longer exists (deleted): ignored everywhere.
    st = state((LAPTOP, DB), BASE_GROUPS, (RuleRecord(("admins",), ("servers",), "ssh"),))
    assert compute_map(st, "laptop2") is None
    netmap = m(st, "db")
    assert [p.id for p in netmap.peers] == ["laptop"]
    assert fw(netmap)[0][2] == ("100.64.0.2/32",)


def test_group_overlap_peer_is_never_its_own_source_and_rules_merge() -> None:
    groups = (("all", {"laptop", "db", "web"}, set()), ("servers", {"db", "web"}, set()))
    rules = (RuleRecord(("all",), ("all",), "tcp", ("80",)), RuleRecord(("servers",), ("servers",), "tcp", ("80",)))
    st = state((LAPTOP, DB, WEB), groups, rules)
    netmap = m(st, "db")
    assert fw(netmap) == [("tcp", ("80",), ("100.64.0.2/32", "100.64.0.4/32"))]
    assert [p.id for p in netmap.peers] == ["laptop", "web"]


def test_group_overlap_ssh_access_excludes_each_peer_itself() -> None:
    groups = (("fleet", {"db", "web", "laptop"}, {"u-alice"}),)
    st = state((LAPTOP, DB, WEB), groups, (RuleRecord(("fleet",), ("fleet",), "ssh"),))
    # laptop does not advertise SSH; db and web do, and each admits the other two only.
    assert m(st, "db").ssh.access[0].sources == ("100.64.0.2/32", "100.64.0.4/32")
    assert m(st, "web").ssh.access[0].sources == ("100.64.0.2/32", "100.64.0.3/32")
    assert not m(st, "laptop").ssh.enabled
    grant = ssh_access(st, "alice@example.com", None, "web")
    assert grant is not None and grant.sources == ("100.64.0.2/32", "100.64.0.3/32")


def test_visibility_is_mutual_without_bidirectional() -> None:
    st = state((LAPTOP, LAPTOP2, DB, WEB), BASE_GROUPS, (RuleRecord(("admins",), ("servers",), "tcp", ("80",)),))
    assert [p.id for p in m(st, "laptop").peers] == ["db", "web"]
    assert [p.id for p in m(st, "db").peers] == ["laptop", "laptop2"]


@pytest.mark.parametrize(
    ("peer_rec", "rule", "enabled"),
    [
        pytest.param(peer("s", "100.64.0.9", ssh=True), RuleRecord(("admins",), ("t",), "ssh"), True, id="ssh-rule"),
        pytest.param(peer("s", "100.64.0.9", ssh=False), RuleRecord(("admins",), ("t",), "ssh"), False,
                     id="not-advertised"),
        pytest.param(peer("s", "100.64.0.9", ssh=True), RuleRecord(("admins",), ("t",), "tcp", ("22",)), False,
                     id="tcp22-toggle-off"),
        pytest.param(peer("s", "100.64.0.9", ssh=True, toggle=True), RuleRecord(("admins",), ("t",), "tcp", ("22",)),
                     True, id="tcp22-toggle-on"),
        pytest.param(peer("s", "100.64.0.9", ssh=True, toggle=True), RuleRecord(("admins",), ("t",), "tcp", ("80",)),
                     False, id="toggle-on-no-22"),
        pytest.param(peer("s", "100.64.0.9", ssh=True, toggle=True), RuleRecord(("admins",), ("t",), "all"),
                     True, id="toggle-on-all"),
        pytest.param(peer("s", "100.64.0.9", ssh=True, toggle=True), RuleRecord(("admins",), ("t",), "udp", ("22",)),
                     False, id="udp-22-is-not-ssh"),
        pytest.param(peer("s", "100.64.0.9", ssh=False, toggle=True), RuleRecord(("admins",), ("t",), "all"),
                     False, id="toggle-without-advertising"),
    ],
)
def test_ssh_enabled(peer_rec: PeerRecord, rule: RuleRecord, enabled: bool) -> None:
    groups = (("admins", {"laptop"}, {"u-alice"}), ("t", {"s"}, set()))
    st = state((LAPTOP, peer_rec), groups, (rule,))
    netmap = m(st, "s")
    assert netmap.ssh.enabled is enabled
    assert netmap.peer.ssh_enabled is enabled
    assert bool(netmap.ssh.jwks) is enabled
    assert (("tcp", ("22022",), ("100.64.0.2/32",)) in fw(netmap)) is (enabled and rule.protocol != "all")
    # What other peers see about it agrees with its own map.
    assert m(st, "laptop").peers[0].ssh_enabled is enabled


def test_ssh_section_contents() -> None:
    rule = RuleRecord(("admins", "user:carol@example.com"), ("servers",), "ssh", local_users=("deploy", "localpart"))
    st = state((LAPTOP, LAPTOP2, DB), BASE_GROUPS, (rule,))
    ssh = m(st, "db").ssh
    assert ssh.issuer == "https://mgmt.example"
    assert ssh.jwks == JWKS
    assert ssh.audience == ("db",)
    assert ssh.user_claim == "email"
    assert len(ssh.access) == 1
    access = ssh.access[0]
    assert access.sources == ADMIN_SOURCES
    # eve is blocked; carol comes from the user: entry.
    assert access.identities == ("alice@example.com", "bob@example.com", "carol@example.com")
    assert access.local_users == ("deploy", "localpart")


def test_accept_env_travels_with_the_access_rule() -> None:
    plain = RuleRecord(("admins",), ("servers",), "ssh", local_users=("admin",))
    narrow = replace(plain, local_users=("deploy",), accept_env=())
    wide = replace(plain, local_users=("dev",), accept_env=("LANG", "GIT_*"))
    access = m(state((LAPTOP, DB), BASE_GROUPS, (plain, narrow, wide)), "db").ssh.access
    assert [(a.local_users, a.accept_env) for a in access] == [
        (("admin",), None), (("deploy",), ()), (("dev",), ("LANG", "GIT_*"))]
    wire = [a.to_dict() for a in access]
    assert "accept_env" not in wire[0]   # the wire form of a rule without it is as before
    assert wire[1]["accept_env"] == [] and wire[2]["accept_env"] == ["LANG", "GIT_*"]
    assert RuleRecord.from_dict({"accept_env": ["LANG"]}).accept_env == ("LANG",)
    assert RuleRecord.from_dict({}).accept_env is None


@pytest.mark.parametrize(
    ("local_users", "allow_root", "expected"),
    [
        pytest.param((), False, ("localpart",), id="default-localpart"),
        pytest.param(("root", "admin"), False, ("admin",), id="root-dropped"),
        pytest.param(("admin",), True, ("admin", "root"), id="root-added"),
        pytest.param(("*",), False, ("*",), id="star"),
    ],
)
def test_local_users(local_users: tuple[str, ...], allow_root: bool, expected: tuple[str, ...]) -> None:
    rule = RuleRecord(("admins",), ("servers",), "ssh", local_users=local_users, allow_root=allow_root)
    st = state((LAPTOP, DB), BASE_GROUPS, (rule,))
    assert m(st, "db").ssh.access[0].local_users == expected
    grant = ssh_access(st, "alice@example.com", None, "db")
    assert grant is not None and grant.local_users == expected


def test_rule_without_users_grants_packets_but_no_logins() -> None:
    groups = (("laptops", {"laptop"}, set()), ("servers", {"db"}, set()))
    st = state((LAPTOP, DB), groups, (RuleRecord(("laptops",), ("servers",), "ssh"),))
    netmap = m(st, "db")
    assert netmap.ssh.enabled and netmap.ssh.access == ()
    assert ssh_access(st, "alice@example.com", None, "db") is None
    # ... unless the caller counts the identity in the source group (external groups claim).
    assert ssh_access(st, "alice@example.com", ["laptops"], "db") is not None


def test_user_only_sources_admit_every_peer() -> None:
    st = state((LAPTOP, LAPTOP2, DB), BASE_GROUPS, (RuleRecord(("user:alice@example.com",), ("servers",), "ssh"),))
    access = m(st, "db").ssh.access
    assert access[0].sources == ADMIN_SOURCES and access[0].identities == ("alice@example.com",)


def test_ssh_access_and_reachable_peers() -> None:
    rules = (RuleRecord(("admins",), ("servers",), "ssh", local_users=("ops",)),
             RuleRecord(("admins",), ("servers",), "tcp", ("22",), local_users=("web",)))
    st = state((LAPTOP, LAPTOP2, DB, WEB), BASE_GROUPS, rules)
    grant = ssh_access(st, "Alice@Example.com", None, "web")
    assert grant is not None and grant.local_users == ("ops", "web")
    assert ssh_access(st, "alice@example.com", None, "db").local_users == ("ops",)  # type: ignore[union-attr]
    assert ssh_access(st, "eve@example.com", None, "db") is None  # blocked
    assert ssh_access(st, "mallory@example.com", None, "db") is None
    assert ssh_access(st, "alice@example.com", None, "laptop") is None  # SSH off there
    assert ssh_access(st, "alice@example.com", None, "gone") is None
    peers = reachable_peers(st, "bob@example.com")
    assert [(p.name, p.local_users) for p in peers] == [("db", ("ops",)), ("web", ("ops", "web"))]
    assert peers[0].ssh_host_keys == ("ssh-ed25519 KEYdb",)


def test_find_peer_by_id_name_fqdn_ip() -> None:
    st = state((LAPTOP, DB), BASE_GROUPS)
    for ref in ("db", "DB", "db.mesh.internal", "db.mesh.internal.", "100.64.0.3"):
        assert find_peer(st, ref) == DB
    assert find_peer(st, "nope") is None


def test_deterministic_and_serial_only_in_serial() -> None:
    rules = (RuleRecord(("admins",), ("servers",), "ssh"), RuleRecord(("servers",), ("admins",), "udp", ("53",)))
    a = state((LAPTOP, LAPTOP2, DB, WEB), BASE_GROUPS, rules, serial=7)
    shuffled = replace(a, peers=tuple(reversed(a.peers)), groups=tuple(reversed(a.groups)), serial=8)
    ma, mb = m(a, "db"), m(shuffled, "db")
    assert ma.to_dict() | {"serial": 0} == mb.to_dict() | {"serial": 0}
    assert map_fingerprint(ma) == map_fingerprint(mb)
    assert (ma.serial, mb.serial) == (7, 8)
    # The wire form round-trips through the shared types.
    assert NetworkMap.from_dict(ma.to_dict()) == ma


def test_encoded_message_is_the_wire_form() -> None:
    import json

    from meshmgmt.netmap import encode_map

    st = state((LAPTOP, DB), BASE_GROUPS, (RuleRecord(("admins",), ("servers",), "ssh"),))
    netmap = m(st, "db")
    fp, text = encode_map(netmap)
    doc = json.loads(text)
    assert doc["type"] == "netmap" and NetworkMap.from_dict(doc["netmap"]) == netmap
    assert fp == map_fingerprint(netmap)


def test_fingerprint_changes_with_content() -> None:
    st = state((LAPTOP, DB), BASE_GROUPS, (RuleRecord(("admins",), ("servers",), "tcp", ("80",)),))
    st2 = state((LAPTOP, DB), BASE_GROUPS, (RuleRecord(("admins",), ("servers",), "tcp", ("81",)),))
    assert map_fingerprint(m(st, "db")) != map_fingerprint(m(st2, "db"))


PERMIT_LISTS = [pytest.param("permit_open", ("db.internal:5432",), ("db",), id="permit_open"),
                pytest.param("permit_listen", ("localhost:8080",), ("x:y",), id="permit_listen")]


@pytest.mark.parametrize("key, entries, bad", PERMIT_LISTS)
def test_permit_lists_reach_ssh_peers_only(key, entries, bad):
    st = replace(state([LAPTOP, DB], BASE_GROUPS, [RuleRecord(("admins",), ("servers",), "ssh", ())]),
                 **{key: entries})
    assert getattr(m(st, "db").ssh, key) == entries
    assert getattr(m(st, "laptop").ssh, key) == ()   # no SSH server there: nothing to fence


@pytest.mark.parametrize("key, entries, bad", PERMIT_LISTS)
def test_mgmt_settings_validate_permit_lists(tmp_path, key, entries, bad):
    from meshmgmt.errors import BadRequest
    from meshmgmt.settings import MgmtSettings

    assert getattr(MgmtSettings(data_dir=tmp_path, **{f"ssh_{key}": entries}), f"ssh_{key}") == entries
    with pytest.raises(BadRequest, match=f"--ssh-{key.replace('_', '-')}"):
        MgmtSettings(data_dir=tmp_path, **{f"ssh_{key}": bad})
