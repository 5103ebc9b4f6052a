"""Why there is no SSH token: each cause named with its fix, from one mesh snapshot (the
old answer, "not SSH-enabled (meshmgmt peer ssh on ...)", was wrong for most of them)."""

from __future__ import annotations

import dataclasses

import pytest

from meshmgmt.idp.exchange import Refused, decide
from meshmgmt.idp.why_not import SERVING, STATE_WORDS, ssh_state
from meshmgmt.idp.tokens import Identity
from meshmgmt.state import GroupRecord, MeshState, PeerRecord, PolicyRecord, RuleRecord, UserRecord

ALICE = UserRecord(id="u1", email="alice@example.com")
SRV = PeerRecord(id="p1", name="srv-1", mesh_ip="100.64.0.10", allow_server_ssh=True)
LAPTOP = PeerRecord(id="p2", name="laptop", mesh_ip="100.64.0.20")


def state(*policies: PolicyRecord, laptops: frozenset[str] = frozenset({"p2"}), toggle: bool = False) -> MeshState:
    srv = dataclasses.replace(SRV, ssh_enabled=toggle)
    return MeshState(network="100.64.0.0/10", peers=(srv, LAPTOP), users=(ALICE,), groups=(
        GroupRecord(id="g1", name="servers", peer_ids=frozenset({"p1"})),
        GroupRecord(id="g2", name="laptops", peer_ids=laptops, user_ids=frozenset({"u1"})),
        GroupRecord(id="g3", name="others")), policies=policies)


def rule(protocol: str = "ssh", sources: tuple[str, ...] = ("laptops",), ports: tuple[str, ...] = ()) -> RuleRecord:
    return RuleRecord(sources=sources, destinations=("servers",), protocol=protocol, ports=ports,
                      local_users=("*",))


def refusal(mesh: MeshState) -> Refused:
    got = decide(mesh, Identity(sub="u1", email=ALICE.email), "srv-1")
    assert isinstance(got, Refused), got
    return got


@pytest.mark.parametrize("mesh, reason, fix", [
    (state(), "no-policy-for-peer", "meshmgmt policies create NAME"),
    (state(PolicyRecord(id="x", name="db-only", rules=(rule("tcp", ports=("5432",)),))),
     "no-policy-for-peer", "meshmgmt policies create NAME"),
    (state(PolicyRecord(id="x", name="ssh-in", enabled=False, rules=(rule(),))),
     "policy-disabled", "meshmgmt policies enable ssh-in"),
    (state(PolicyRecord(id="x", name="port-22", rules=(rule("tcp", ports=("22",)),))),
     "ssh-toggle-off", "meshmgmt peers ssh srv-1 on"),
    (state(PolicyRecord(id="x", name="ssh-in", rules=(rule(),)), laptops=frozenset()),
     "no-source-peers", "meshmgmt groups update GROUP --add-peer PEER"),
    (state(PolicyRecord(id="x", name="ssh-in", rules=(rule(),))), None, None),   # it works
])
def test_each_cause_is_named_with_its_fix(mesh: MeshState, reason: str | None, fix: str | None) -> None:
    if reason is None:   # a working policy: the token is issued
        assert not isinstance(decide(mesh, Identity(sub="u1", email=ALICE.email), "srv-1"), Refused)
        return
    got = refusal(mesh)
    assert got.reason == reason and fix in got.description, got


def test_an_identity_in_no_rule_and_a_disabled_rule_for_it() -> None:
    # SSH is on for the peer (others may reach it), but alice is in no rule
    others_only = PolicyRecord(id="x", name="others-in", rules=(rule(sources=("others", "laptops")),))
    mesh = MeshState(network="100.64.0.0/10", peers=(SRV, LAPTOP), users=(ALICE,), groups=(
        GroupRecord(id="g1", name="servers", peer_ids=frozenset({"p1"})),
        GroupRecord(id="g2", name="laptops", peer_ids=frozenset({"p2"})),
        GroupRecord(id="g3", name="others", user_ids=frozenset({"u9"}))), policies=(others_only,))
    got = refusal(mesh)
    assert (got.reason, got.description) == ("no-policy", "no policy lets alice@example.com reach srv-1")
    disabled_for_alice = PolicyRecord(id="y", name="alice-in", enabled=False,
                                      rules=(rule(sources=("user:alice@example.com",)),))
    mesh = dataclasses.replace(mesh, policies=(others_only, disabled_for_alice))
    got = refusal(mesh)
    assert got.reason == "policy-disabled" and "meshmgmt policies enable alice-in" in got.description


@pytest.mark.parametrize("mesh, code", [
    pytest.param(state(), "no-policy-for-peer", id="no-policy"),
    pytest.param(state(PolicyRecord(id="x", name="port-22", rules=(rule("tcp", ports=("22",)),))),
                 "ssh-toggle-off", id="toggle-off"),
    pytest.param(state(PolicyRecord(id="x", name="port-22", rules=(rule("tcp", ports=("22",)),)), toggle=True),
                 SERVING, id="toggle-on"),
    pytest.param(state(PolicyRecord(id="x", name="ssh-in", enabled=False, rules=(rule(),))),
                 "policy-disabled", id="policy-disabled"),
    pytest.param(state(PolicyRecord(id="x", name="ssh-in", rules=(rule(),)), laptops=frozenset()),
                 "no-source-peers", id="no-source-peers"),
])
def test_the_effective_state_is_the_exchanges_answer(mesh: MeshState, code: str) -> None:
    """`meshmgmt peers list` shows what the token exchange would answer for the peer."""
    got, message = ssh_state(mesh, mesh.peers_by_id["p1"])
    assert got == code and code in STATE_WORDS
    if code == SERVING:
        assert message == ""
    else:
        assert refusal(mesh).reason == code and refusal(mesh).description == message


def test_a_peer_that_does_not_offer_ssh_is_not_served() -> None:
    code, message = ssh_state(state(), LAPTOP)
    assert (STATE_WORDS[code], code) == ("not served", "ssh-not-served") and "--allow-server-ssh" in message
