"""Pure parts of the SSH server: algorithms, limits math, forwarding policy,
identification string, revocation decision."""

from __future__ import annotations

import re

import pytest

from meshsshd import algorithms
from meshsshd.config import JWTSettings, Limits, ServerSettings
from meshsshd.forwarding import may_listen
from meshsshd.limits import AuthTries, Penalties, StartupGate, drop_probability
from meshsshd.server import JWT_MARKER, server_version


# ---- algorithms -------------------------------------------------------------------------
def test_allowlists_have_no_sha1_cbc_or_weak_macs():
    every = (*algorithms.KEX_ALGS, *algorithms.ENCRYPTION_ALGS, *algorithms.mac_algs(False), *algorithms.SIGNATURE_ALGS)
    assert algorithms.weak_names(every) == []
    assert algorithms.COMPRESSION_ALGS == ("none",)
    assert "ssh-rsa" not in algorithms.SIGNATURE_ALGS


def test_weak_names_catches_the_usual_suspects():
    assert algorithms.weak_names(["diffie-hellman-group14-sha1", "hmac-sha1", "aes128-cbc", "ssh-rsa",
                                  "umac-64-etm@openssh.com", "rsa-sha2-256"]) == [
        "diffie-hellman-group14-sha1", "hmac-sha1", "aes128-cbc", "ssh-rsa", "umac-64-etm@openssh.com"]


def test_kex_prefers_post_quantum_then_curve25519():
    assert algorithms.KEX_ALGS[0] == "mlkem768x25519-sha256"
    assert algorithms.KEX_ALGS[1] == "curve25519-sha256"


def test_every_listed_algorithm_is_supported_by_asyncssh():
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs
    from asyncssh.public_key import get_public_key_algs

    for names, supported in ((algorithms.KEX_ALGS, get_kex_algs()), (algorithms.ENCRYPTION_ALGS, get_encryption_algs()),
                             (algorithms.mac_algs(False), get_mac_algs()), (algorithms.SIGNATURE_ALGS, get_public_key_algs())):
        missing = [n for n in names if n.encode() not in supported]
        assert missing == []


def test_host_keypairs_offer_only_sha2_rsa():
    import asyncssh

    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    ed = asyncssh.generate_private_key("ssh-ed25519")
    pairs = algorithms.host_keypairs([ed, rsa])
    algs = sorted(a.decode() for kp in pairs for a in kp.host_key_algorithms)
    assert algs == ["rsa-sha2-256", "rsa-sha2-512", "ssh-ed25519"]


# ---- MaxStartups ------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "expected"), [
    pytest.param(0, 0.0, id="empty"),
    pytest.param(9, 0.0, id="below-start"),
    pytest.param(10, 0.30, id="at-start-rate"),
    pytest.param(55, 0.65, id="half-way"),
    pytest.param(100, 1.0, id="full"),
    pytest.param(500, 1.0, id="beyond-full"),
])
def test_drop_probability_curve(n, expected):
    assert drop_probability(n, 10, 30, 100) == pytest.approx(expected)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_gate_admits_below_start_and_refuses_when_full_and_nothing_stalled():
    clock = FakeClock()
    gate = StartupGate(Limits(max_startups=(2, 50, 4)), rng=lambda: 0.99, clock=clock)
    assert gate.admit("a", "s").admitted and gate.admit("b", "s").admitted
    assert gate.admit("c", "s").admitted          # 50% drop, rng says keep
    assert gate.admit("d", "s").admitted          # 75%, still kept by rng 0.99
    refused = gate.admit("e", "s")                # full: 100%, nobody stalled yet
    assert not refused.admitted and refused.reason == "max-startups"


def test_gate_evicts_the_stalest_connection_wherever_it_stalls():
    clock = FakeClock()
    gate = StartupGate(Limits(max_startups=(2, 100, 2)), stall_after=0.1, rng=lambda: 0.0, clock=clock,
                       stage=lambda key: 2)   # both past key exchange
    assert gate.admit("parked", "s").admitted
    gate.progressed("parked")                          # reached userauth, then stalls there
    clock.now += 0.05
    assert gate.admit("login", "s").admitted
    assert not gate.admit("early", "s").admitted        # nobody stalled for 0.1 s yet
    clock.now += 0.2
    gate.progressed("login")                            # a real login keeps moving
    result = gate.admit("real", "s")
    assert result.admitted and result.evict == "parked" and result.reason == "max-startups-evict"
    assert gate.unauthenticated == 2


def test_a_silent_connection_makes_room_sooner_than_a_talking_one():
    """Sockets that never sent their identification string yield after silent_after, so
    a storm of them reconnecting from the client's own address (each one young) cannot
    keep every slot; a connection that identified itself keeps stall_after."""
    clock = FakeClock()
    stages = {"talking": 1, "silent": 0}
    gate = StartupGate(Limits(max_startups=(2, 100, 2)), stall_after=0.1, silent_after=0.02,
                       rng=lambda: 0.0, clock=clock, stage=lambda key: stages.get(key, 0))
    assert gate.admit("talking", "s").admitted and gate.admit("silent", "s").admitted
    clock.now += 0.01
    assert not gate.admit("early", "s").admitted        # both younger than silent_after
    clock.now += 0.02
    result = gate.admit("newcomer", "s")
    assert result.admitted and result.evict == "silent"
    clock.now += 0.03                                   # newcomer is silent too, and older now
    assert gate.admit("next", "s").evict == "newcomer"  # never "talking", 0.06 s < stall_after


def test_gate_evicts_from_the_source_holding_most_slots_at_once():
    """Churn younger than stall_after: a newcomer from a quiet address still gets in."""
    clock = FakeClock()
    gate = StartupGate(Limits(max_startups=(4, 100, 4)), stall_after=10.0, rng=lambda: 0.0, clock=clock,
                       stage=lambda key: 1)   # hello-only churn: identified, then nothing
    assert gate.admit("mine", "real").admitted
    for i in range(3):
        clock.now += 0.01
        assert gate.admit(f"f{i}", "flood").admitted
    assert not gate.admit("f3", "flood").admitted      # same address: nothing stalled enough
    result = gate.admit("real2", "real")
    assert result.admitted and result.evict == "f0"    # the flood's oldest, not "mine"


def test_per_source_cap_replaces_only_that_sources_stalled_connection():
    clock = FakeClock()
    limits = Limits(max_startups=(100, 30, 200), per_source_max_startups=2)
    gate = StartupGate(limits, stall_after=0.1, rng=lambda: 0.0, clock=clock)
    assert gate.admit("a1", "a").admitted and gate.admit("a2", "a").admitted
    assert gate.admit("b1", "b").admitted
    refused = gate.admit("a3", "a")
    assert not refused.admitted and refused.reason == "per-source-max-startups"
    clock.now += 1.0
    gate.progressed("a2")
    result = gate.admit("a4", "a")
    assert result.admitted and result.evict == "a1"    # never b1, another address's slot
    assert gate.unauthenticated == 3


def test_gate_done_frees_the_slot():
    gate = StartupGate(Limits(max_startups=(1, 100, 1)), rng=lambda: 0.0, clock=FakeClock())
    assert gate.admit("a", "s").admitted
    assert not gate.admit("b", "s").admitted
    gate.done("a")
    assert gate.admit("c", "s").admitted


# ---- penalties and tries ----------------------------------------------------------------
def test_penalty_after_repeated_failures_then_expires():
    clock = FakeClock()
    p = Penalties(Limits(penalty_failures=3, penalty_seconds=30.0), clock=clock)
    assert not p.record_failure("10.0.0.1")
    assert not p.record_failure("10.0.0.1")
    assert p.blocked_for("10.0.0.1") == 0
    assert p.record_failure("10.0.0.1")
    assert p.blocked_for("10.0.0.1") == pytest.approx(30.0)
    assert p.blocked_for("10.0.0.2") == 0
    clock.now += 31
    assert p.blocked_for("10.0.0.1") == 0


def test_old_failures_are_forgotten():
    clock = FakeClock()
    p = Penalties(Limits(penalty_failures=2, penalty_seconds=1.0), clock=clock)
    p.record_failure("a")
    clock.now += 100
    assert not p.record_failure("a")
    p.prune()


def test_auth_tries_limit():
    tries = AuthTries(3)
    assert [tries.fail(), tries.fail(), tries.fail()] == [False, False, True]


# ---- remote forward policy --------------------------------------------------------------
@pytest.mark.parametrize(("host", "port", "uid", "ok"), [
    pytest.param("localhost", 8080, 1000, True, id="localhost"),
    pytest.param("127.0.0.1", 0, 1000, True, id="loopback-any-port"),
    pytest.param("::1", 9000, 1000, True, id="ipv6-loopback"),
    pytest.param("100.64.0.5", 9000, 1000, True, id="own-mesh-address"),
    pytest.param("", 9000, 1000, False, id="all-interfaces-empty"),
    pytest.param("0.0.0.0", 9000, 1000, False, id="all-interfaces-v4"),
    pytest.param("::", 9000, 1000, False, id="all-interfaces-v6"),
    pytest.param("192.168.1.10", 9000, 1000, False, id="foreign-address"),
    pytest.param("127.0.0.1", 80, 1000, False, id="privileged-port-non-root"),
    pytest.param("127.0.0.1", 80, 0, True, id="privileged-port-root"),
])
def test_may_listen(host, port, uid, ok):
    assert may_listen(host, port, uid=uid, own_addresses=("100.64.0.5",)).allowed is ok


# ---- identification string --------------------------------------------------------------
def test_server_version_carries_jwt_marker_only_with_jwt():
    jwt = JWTSettings(issuer="https://i", audience=("peer",), jwks={"keys": []})
    assert server_version(ServerSettings(jwt=jwt)).endswith(" " + JWT_MARKER)
    assert JWT_MARKER not in server_version(ServerSettings(jwt=jwt, disable_auth=True))
    assert server_version(ServerSettings(authorized_keys=True)) == "meshsshd_0.1"


@pytest.mark.parametrize("value, message", [
    (-1, "limits.per_source_max_startups"),
    (1.5, "limits.per_source_max_startups"),
    (101, "is above max_startups' full (100)"),
])
def test_per_source_max_startups_is_range_checked(value, message):
    from meshsshd.config import settings_from_dict
    from meshsshd.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_from_dict({"listen": ["127.0.0.1:0"], "authorized_keys": True, "limits": {"per_source_max_startups": value}})
    ok = settings_from_dict({"listen": ["127.0.0.1:0"], "authorized_keys": True, "limits": {"per_source_max_startups": 20}})
    assert ok.limits.per_source_max_startups == 20
