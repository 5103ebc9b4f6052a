"""Pure rules of the embedded issuer: keys and rotation overlap, token claims and
lifetimes, jti uniqueness, the device-flow state machine (clock injected)."""

from __future__ import annotations

import base64
import json

import jwt
import pytest

from meshmgmt.idp import device, tokens
from meshmgmt.idp.errors import IdpError
from meshmgmt.idp.grants import revoked_text
from meshmgmt.idp.keys import (
    KeyRing,
    generate_key,
    thumbprint,
)
from meshsshd.auth import JWTValidator
from meshsshd.config import JWTSettings

ISS = "https://mgmt.example"
T0 = 1_800_000_000.0
ALICE = tokens.Identity(sub="u1", email="alice@example.com", name="Alice", role="user")


def _b64(segment: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return KeyRing([generate_key(T0)], overlap=3600)


# --- keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_generated_key_publishes_only_public_parts(alg: str) -> None:
    key = generate_key(T0, alg)
    jwk = key.public_jwk()
    assert jwk["alg"] == alg and jwk["use"] == "sig" and jwk["kid"] == key.kid
    assert "d" not in jwk  # no private component
    assert key.kid == thumbprint(jwk)


def test_refuses_symmetric_or_unknown_algorithms() -> None:
    with pytest.raises(ValueError):
        generate_key(T0, "HS256")


def test_rotation_keeps_previous_key_during_overlap_only() -> None:
    old = generate_key(T0)
    ring = KeyRing([old], overlap=3600)
    token = tokens.sign(tokens.access_claims(ALICE, ISS, "meshssh", T0 + 10), old, tokens.ACCESS_TOKEN_TYPE)

    new = generate_key(T0 + 100)
    rotated = ring.rotated(new, T0 + 100)
    assert rotated.current().kid == new.kid
    kids = [k["kid"] for k in rotated.jwks(T0 + 200)["keys"]]
    assert kids == [new.kid, old.kid]  # signer first, previous still published
    # A token signed by the previous key still verifies during the overlap ...
    claims = tokens.verify(token, rotated, ISS, tokens.ACCESS_AUDIENCE, T0 + 200, typ=tokens.ACCESS_TOKEN_TYPE)
    assert claims["sub"] == "u1"
    # ... and the old key is gone after it (and can be pruned).
    after = T0 + 100 + 3600
    assert [k["kid"] for k in rotated.jwks(after)["keys"]] == [new.kid]
    assert [k.kid for k in rotated.expired(after)] == [old.kid]
    with pytest.raises(IdpError) as err:
        tokens.verify(token, rotated, ISS, tokens.ACCESS_AUDIENCE, after, typ=tokens.ACCESS_TOKEN_TYPE, leeway=10**9)
    assert err.value.reason == "unknown-key"


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
async def test_ssh_token_passes_the_peer_validator(alg: str) -> None:
    """What the issuer signs and publishes is what meshsshd's validator accepts."""
    ring = KeyRing([generate_key(T0, alg)], overlap=3600)
    token = tokens.sign(tokens.ssh_claims(ALICE, ISS, "peer-1", ("alice",), T0), ring.current())
    settings = JWTSettings(issuer=ISS, audience=("peer-1",), jwks=ring.jwks(T0), user_claim="email")
    validator = JWTValidator(settings, clock=lambda: T0 + 5, started=T0 - 60)
    try:
        identity = await validator.validate(token)
    finally:
        await validator.close()
    assert identity.value == "alice@example.com"
    assert identity.local_users == ("alice",)


# --- token claims -----------------------------------------------------------------------


def test_access_token_claims_and_lifetime(ring: KeyRing) -> None:
    token = tokens.sign(tokens.access_claims(ALICE, ISS, "meshssh", T0), ring.current(), tokens.ACCESS_TOKEN_TYPE)
    header_b64, payload_b64, _ = token.split(".")
    header, claims = _b64(header_b64), _b64(payload_b64)
    assert header == {"alg": "EdDSA", "kid": ring.current().kid, "typ": "at+jwt"}
    assert claims["aud"] == "meshmgmt" and claims["iss"] == ISS
    assert (claims["sub"], claims["email"], claims["name"], claims["role"]) == ("u1", "alice@example.com", "Alice", "user")
    assert claims["exp"] - claims["iat"] == 15 * 60
    assert claims["nbf"] == claims["iat"] == int(T0)


def test_ssh_token_claims(ring: KeyRing) -> None:
    claims = tokens.ssh_claims(ALICE, ISS, "peer-123", ("alice", "deploy"), T0, via="peer-9")
    token = tokens.sign(claims, ring.current())
    decoded = jwt.decode(token, ring.current().private_key.public_key(), algorithms=["EdDSA"],
                         audience="peer-123", issuer=ISS, options={"verify_exp": False, "verify_iat": False,
                                                                   "verify_nbf": False})
    assert decoded["aud"] == "peer-123"
    assert decoded["exp"] - decoded["iat"] == 60
    assert decoded["local_users"] == ["alice", "deploy"]
    assert decoded["via"] == "peer-9"
    assert decoded["email"] == "alice@example.com" and decoded["sub"] == "u1"
    assert "via" not in tokens.ssh_claims(ALICE, ISS, "p", ("a",), T0)


def test_jti_is_unique_and_random() -> None:
    jtis = {tokens.ssh_claims(ALICE, ISS, "p", ("a",), T0)["jti"] for _ in range(2000)}
    assert len(jtis) == 2000
    assert all(len(j) >= 20 for j in jtis)


@pytest.mark.parametrize(
    ("now", "audience", "typ", "reason"),
    [
        pytest.param(T0 + 900 + 30, "meshmgmt", "at+jwt", "expired", id="expired-after-leeway"),
        pytest.param(T0 - 31, "meshmgmt", "at+jwt", "not-yet-valid", id="issued-in-future"),
        pytest.param(T0 + 1, "peer-1", "at+jwt", "wrong-audience", id="wrong-audience"),
        pytest.param(T0 + 1, "meshmgmt", "ssh+jwt", "wrong-type", id="wrong-type"),
    ],
)
def test_verify_refusals(ring: KeyRing, now: float, audience: str, typ: str, reason: str) -> None:
    token = tokens.sign(tokens.access_claims(ALICE, ISS, "meshssh", T0), ring.current(), tokens.ACCESS_TOKEN_TYPE)
    with pytest.raises(IdpError) as err:
        tokens.verify(token, ring, ISS, audience, now, typ=typ)
    assert err.value.reason == reason


def test_verify_accepts_within_leeway(ring: KeyRing) -> None:
    token = tokens.sign(tokens.access_claims(ALICE, ISS, "meshssh", T0), ring.current(), tokens.ACCESS_TOKEN_TYPE)
    assert tokens.verify(token, ring, ISS, "meshmgmt", T0 + 900 + 29, typ="at+jwt")["sub"] == "u1"


def test_verify_refuses_other_issuer_and_tampering(ring: KeyRing) -> None:
    token = tokens.sign(tokens.access_claims(ALICE, "https://evil", "meshssh", T0), ring.current(), "at+jwt")
    with pytest.raises(IdpError) as err:
        tokens.verify(token, ring, ISS, "meshmgmt", T0, typ="at+jwt")
    assert err.value.reason == "wrong-issuer"
    good = tokens.sign(tokens.access_claims(ALICE, ISS, "meshssh", T0), ring.current(), "at+jwt")
    h, p, s = good.split(".")
    forged = dict(_b64(p), role="admin")
    p2 = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(IdpError) as err:
        tokens.verify(f"{h}.{p2}.{s}", ring, ISS, "meshmgmt", T0, typ="at+jwt")
    assert err.value.reason == "bad-signature"


def test_verify_refuses_a_key_from_elsewhere(ring: KeyRing) -> None:
    stranger = generate_key(T0)
    token = tokens.sign(tokens.access_claims(ALICE, ISS, "meshssh", T0), stranger, "at+jwt")
    with pytest.raises(IdpError) as err:
        tokens.verify(token, ring, ISS, "meshmgmt", T0, typ="at+jwt")
    assert err.value.reason == "unknown-key"


def test_verify_refuses_hs256_even_with_a_known_kid(ring: KeyRing) -> None:
    token = jwt.encode(tokens.access_claims(ALICE, ISS, "meshssh", T0), "k" * 32, algorithm="HS256",
                       headers={"kid": ring.current().kid, "typ": "at+jwt"})
    with pytest.raises(IdpError) as err:
        tokens.verify(token, ring, ISS, "meshmgmt", T0, typ="at+jwt")
    assert err.value.reason == "bad-algorithm"


# --- device flow ------------------------------------------------------------------------


def test_user_codes_look_like_abcd_efgh() -> None:
    codes = {device.new_user_code() for _ in range(500)}
    assert len(codes) > 490
    for code in codes:
        assert len(code) == 9 and code[4] == "-"
        assert all(ch in device.USER_CODE_ALPHABET for ch in code.replace("-", ""))


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        pytest.param("BCDF-GHJK", "BCDF-GHJK", id="canonical"),
        pytest.param(" bcdf ghjk ", "BCDF-GHJK", id="lowercase-spaces"),
        pytest.param("bcdfghjk", "BCDF-GHJK", id="no-dash"),
        pytest.param("ABCD-EFGH", None, id="vowels-not-in-alphabet"),
        pytest.param("BCDF-GHJ", None, id="too-short"),
        pytest.param("<script>", None, id="markup"),
    ],
)
def test_normalize_user_code(typed: str, expected: str | None) -> None:
    assert device.normalize_user_code(typed) == expected


def test_device_flow_pending_slow_down_then_issue_once() -> None:
    g = device.new_grant(T0, ttl=600, interval=5)
    out, g = device.poll(g, T0 + 1)
    assert out is device.PollOutcome.PENDING
    out, g = device.poll(g, T0 + 2)  # 1 s after the last poll: too fast
    assert out is device.PollOutcome.SLOW_DOWN and g.interval == 10
    out, g = device.poll(g, T0 + 7)  # 5 s is no longer enough: the interval grew
    assert out is device.PollOutcome.SLOW_DOWN and g.interval == 15
    out, g = device.poll(g, T0 + 22)
    assert out is device.PollOutcome.PENDING
    decided = device.decide(g, True, "u1", T0 + 30)
    assert isinstance(decided, device.DeviceGrant) and decided.status is device.DeviceStatus.APPROVED
    out, g = device.poll(decided, T0 + 31)  # approved: issue even if a little fast
    assert out is device.PollOutcome.ISSUE and g.status is device.DeviceStatus.CONSUMED
    out, _ = device.poll(g, T0 + 60)
    assert out is device.PollOutcome.USED


def test_device_flow_exact_interval_is_not_slow_down() -> None:
    g = device.new_grant(T0, interval=5)
    _, g = device.poll(g, T0 + 1)
    out, _ = device.poll(g, T0 + 6)
    assert out is device.PollOutcome.PENDING


def test_device_flow_denied_and_expired() -> None:
    g = device.new_grant(T0, ttl=600)
    denied = device.decide(g, False, "u1", T0 + 5)
    assert isinstance(denied, device.DeviceGrant)
    assert device.poll(denied, T0 + 10)[0] is device.PollOutcome.DENIED
    assert device.decide(denied, True, "u1", T0 + 11) is device.DecisionRefused.ALREADY_DECIDED
    assert device.poll(g, T0 + 600)[0] is device.PollOutcome.EXPIRED
    assert device.decide(g, True, "u1", T0 + 600) is device.DecisionRefused.EXPIRED
    approved = device.decide(g, True, "u1", T0 + 5)
    assert isinstance(approved, device.DeviceGrant)
    assert device.poll(approved, T0 + 601)[0] is device.PollOutcome.EXPIRED  # approved too late to redeem


# --- what a revoked refresh token's holder is told -----------------------------------------


@pytest.mark.parametrize(("reasons", "says"), [
    pytest.param("blocked", "when an administrator blocked your account", id="blocked"),
    pytest.param("password-reset,blocked", "when an administrator blocked your account", id="block-wins"),
    pytest.param("password-changed", "when your password was changed", id="own-password"),
    pytest.param("password-reset", "when an administrator set a new password", id="admin-password"),
    pytest.param("role-changed", "when an administrator changed your role", id="role"),
    pytest.param("refresh-reused", "used twice", id="reuse"),
    pytest.param(None, "this login was revoked", id="before-reasons-were-kept"),
])
def test_revoked_text_names_what_ended_the_login(reasons: str | None, says: str) -> None:
    assert says in revoked_text(reasons)
