"""JWT validation: each way a token can be wrong is refused with its own reason.

Tokens are signed here with real RSA, P-256 and Ed25519 keys; the JWKS comes from a file,
inline, or a real aiohttp server on 127.0.0.1. The clock is injected, so nothing sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshsshd.auth import (
    MAX_TOKEN_BYTES,
    ClaimExpectations,
    Identity,
    JWTValidator,
    _ReplayCache,
    check_claims,
)
from meshsshd.config import JWTSettings
from meshsshd.errors import AuthRefused
from meshsshd.jwks import (
    DEFAULT_TTL,
    MAX_TTL,
    MIN_TTL,
    REFRESH_COOLDOWN,
    JWKSError,
    parse_jwks,
    ttl_from_cache_control,
)

ISSUER = "https://mgmt.example.test"
AUDIENCE = "peer-db-1"
NOW = 1_800_000_000.0
STARTED = NOW - 60  # the validators' server started a minute before the tokens were issued


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Signer:
    """A private key, its kid and the JWS algorithm it signs with."""

    def __init__(self, key: Any, alg: str, kid: str) -> None:
        self.key, self.alg, self.kid = key, alg, kid

    def jwk(self) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.alg)
        jwk = json.loads(algo.to_jwk(self.key.public_key()))
        jwk["kid"] = self.kid
        jwk["use"] = "sig"
        return jwk

    def sign(self, claims: dict[str, Any], *, alg: str | None = None, kid: str | None = "same",
             headers: dict[str, Any] | None = None) -> str:
        hdr = dict(headers or {})
        if kid == "same":
            hdr["kid"] = self.kid
        elif kid is not None:
            hdr["kid"] = kid
        return jwt.encode(claims, self.key, algorithm=alg or self.alg, headers=hdr)


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    return Signer(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", "rsa-1")


@pytest.fixture(scope="module")
def ec_signer() -> Signer:
    return Signer(ec.generate_private_key(ec.SECP256R1()), "ES256", "ec-1")


@pytest.fixture(scope="module")
def ed_signer() -> Signer:
    return Signer(ed25519.Ed25519PrivateKey.generate(), "EdDSA", "ed-1")


@pytest.fixture(scope="module")
def other_rsa() -> Signer:
    """An attacker's key that claims the legitimate kid."""
    return Signer(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", "rsa-1")


def claims(**over: Any) -> dict[str, Any]:
    base = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-123",
        "email": "alice@example.com",
        "iat": int(NOW) - 5,
        "nbf": int(NOW) - 5,
        "exp": int(NOW) + 55,
        "jti": secrets.token_hex(8),
    }
    for key, value in over.items():
        if value is _DROP:
            base.pop(key)
        else:
            base[key] = value
    return base


_DROP = object()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jwks_file(tmp_path: Path, rsa_signer: Signer, ec_signer: Signer, ed_signer: Signer) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_signer.jwk(), ec_signer.jwk(), ed_signer.jwk()]}))
    return path


@pytest.fixture
async def validator(jwks_file: Path, clock: Clock) -> AsyncIterator[JWTValidator]:
    v = JWTValidator(
        JWTSettings(issuer=ISSUER, audience=(AUDIENCE, "db-1.mesh"), jwks_file=jwks_file,
                    user_claim="email"),
        clock=clock, started=STARTED,
    )
    yield v
    await v.close()


async def refused(validator: JWTValidator, token: str) -> AuthRefused:
    with pytest.raises(AuthRefused) as info:
        await validator.validate(token)
    exc = info.value
    assert token not in str(exc) and token not in exc.user_message
    return exc


# --- accepted -------------------------------------------------------------------------


@pytest.mark.parametrize("signer_name, alg", [
    pytest.param("rsa_signer", "RS256", id="rsa-rs256"),
    pytest.param("rsa_signer", "RS512", id="rsa-rs512"),
    pytest.param("rsa_signer", "PS256", id="rsa-ps256"),
    pytest.param("ec_signer", "ES256", id="ec-p256"),
    pytest.param("ed_signer", "EdDSA", id="ed25519"),
])
async def test_valid_tokens_are_accepted(validator: JWTValidator, request: pytest.FixtureRequest,
                                         signer_name: str, alg: str) -> None:
    signer: Signer = request.getfixturevalue(signer_name)
    c = claims(local_users=["alice", "deploy"], via="peer-jump")
    identity = await validator.validate(signer.sign(c, alg=alg))
    assert identity == Identity(
        value="alice@example.com", method="jwt", claims=identity.claims, token_id=c["jti"],
        expires_at=float(c["exp"]), local_users=("alice", "deploy"), via="peer-jump",
    )
    assert identity.claims["sub"] == "user-123"


async def test_audience_list_any_one_matches(validator: JWTValidator, ec_signer: Signer) -> None:
    identity = await validator.validate(ec_signer.sign(claims(aud=["other", "db-1.mesh"])))
    assert identity.local_users is None and identity.via is None


async def test_token_without_kid_is_checked_against_fitting_keys(validator: JWTValidator,
                                                                 ed_signer: Signer) -> None:
    identity = await validator.validate(ed_signer.sign(claims(), kid=None))
    assert identity.value == "alice@example.com"


# --- refused: signature and algorithm -------------------------------------------------


async def test_forged_signature(validator: JWTValidator, other_rsa: Signer) -> None:
    exc = await refused(validator, other_rsa.sign(claims()))
    assert exc.reason == "bad-signature"
    assert "meshssh login" in exc.user_message


async def test_tampered_payload(validator: JWTValidator, rsa_signer: Signer) -> None:
    header, _, sig = rsa_signer.sign(claims()).split(".")
    forged_payload = b64(json.dumps(claims(email="root@example.com")).encode())
    exc = await refused(validator, f"{header}.{forged_payload}.{sig}")
    assert exc.reason == "bad-signature"


async def test_alg_none(validator: JWTValidator, rsa_signer: Signer) -> None:
    exc = await refused(validator, raw_token({"alg": "none", "kid": rsa_signer.kid}, claims()))
    assert exc.reason == "alg-not-allowed"
    assert "none" in exc.user_message


@pytest.mark.parametrize("signer_name", ["rsa_signer", "ec_signer", "ed_signer"])
async def test_hs256_signed_with_the_public_key(validator: JWTValidator, request: pytest.FixtureRequest,
                                                signer_name: str) -> None:
    """The classic confusion: the attacker knows the public key and MACs with it."""
    signer: Signer = request.getfixturevalue(signer_name)
    pem = signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
    payload = b64(json.dumps(claims()).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    exc = await refused(validator, f"{header}.{payload}.{b64(mac)}")
    assert exc.reason == "alg-not-allowed"


async def test_header_alg_that_does_not_fit_the_key_type(validator: JWTValidator, rsa_signer: Signer,
                                                         ec_signer: Signer) -> None:
    # Signed correctly with the EC key, but claims the RSA key's kid: the RSA key may not verify ES256.
    exc = await refused(validator, ec_signer.sign(claims(), kid=rsa_signer.kid))
    assert exc.reason == "alg-not-allowed"
    assert "rsa-1" in exc.user_message


async def test_jwk_alg_member_narrows_the_algorithms(tmp_path: Path, clock: Clock, rsa_signer: Signer) -> None:
    jwk = {**rsa_signer.jwk(), "alg": "RS256"}
    v = JWTValidator(JWTSettings(issuer=ISSUER, audience=(AUDIENCE,), jwks={"keys": [jwk]}), clock=clock, started=STARTED)
    assert (await v.validate(rsa_signer.sign(claims()))).method == "jwt"
    exc = await refused(v, rsa_signer.sign(claims(), alg="PS256"))
    assert exc.reason == "alg-not-allowed"


# --- refused: claims ------------------------------------------------------------------


@pytest.mark.parametrize("over, reason, words", [
    pytest.param({"iss": "https://evil.example"}, "wrong-issuer", "trusts https://mgmt.example.test", id="wrong-issuer"),
    pytest.param({"aud": "peer-other"}, "wrong-audience", "token is for another peer", id="wrong-audience"),
    pytest.param({"aud": ["a", "b"]}, "wrong-audience", "token is for another peer", id="wrong-audience-list"),
    pytest.param({"exp": int(NOW) - 42 - 30, "iat": int(NOW) - 120, "nbf": int(NOW) - 120}, "expired",
                 "token expired 72 s ago, issued 120 s ago", id="expired"),
    pytest.param({"exp": int(NOW) - 60, "iat": int(NOW) - 120, "nbf": int(NOW) - 120}, "expired",
                 "this peer's clock is about 120 s ahead: check the clocks", id="expired-names-a-clock-ahead"),
    pytest.param({"nbf": int(NOW) + 120}, "not-yet-valid", "the issuer dated its `nbf` after its `iat`",
                 id="nbf-future"),
    pytest.param({"iat": int(NOW) + 120, "nbf": int(NOW) + 120, "exp": int(NOW) + 180}, "issued-in-future",
                 "this peer's clock is behind the issuer's", id="iat-future"),
    pytest.param({"iat": int(NOW) - 700, "nbf": int(NOW) - 700, "exp": int(NOW) + 60}, "too-old",
                 "issued 700 s ago", id="iat-too-old"),
    pytest.param({"exp": "soon"}, "malformed", "`exp`", id="exp-not-a-number"),
    # Non-finite, fractional, boolean or huge time claims: NaN compares false with
    # everything (such a token never expired), inf/1e309 and 10**400 broke the arithmetic.
    *(pytest.param({name: value}, "malformed", f"token claim `{name}` {words}", id=f"{name}-{vid}")
      for name in ("exp", "iat", "nbf")
      for vid, value, words in (("nan", float("nan"), "must be a finite number"),
                                ("inf", float("inf"), "must be a finite number"),
                                ("minus-inf", float("-inf"), "must be a finite number"),
                                ("1e309", 1e309, "must be a finite number"),
                                ("fraction", NOW + 0.5, "must be a whole number"),
                                ("bool", True, "must be a whole number"),
                                ("huge", 10**400, "is too large"),
                                ("negative", -1, "must not be negative"))),
    pytest.param({"local_users": "alice"}, "malformed", "local_users", id="local-users-not-a-list"),
])
async def test_claim_refusals(validator: JWTValidator, ec_signer: Signer, over: dict[str, Any],
                              reason: str, words: str) -> None:
    exc = await refused(validator, ec_signer.sign(claims(**over)))
    assert exc.reason == reason
    assert words in exc.user_message


async def test_unsupported_crit_header_names_the_cause(validator: JWTValidator, ec_signer: Signer) -> None:
    exc = await refused(validator, ec_signer.sign(claims(), headers={"crit": ["urn:x"], "urn:x": 1}))
    assert exc.reason == "unsupported-crit"
    assert "urn:x" in exc.user_message and "signature" not in exc.user_message


@pytest.mark.parametrize("offset", [-85, 85])
def test_clock_skew_tolerance_is_symmetric(offset: int) -> None:
    """A fresh 60 s token: a peer clock 85 s behind or ahead accepts it, 95 s refuses it,
    each time naming the clock (it was 30 s behind, 90 s ahead, and ahead said `meshssh login`)."""
    expect = ClaimExpectations(ISSUER, (AUDIENCE,), max_token_age=600, leeway=30, user_claim="email")
    fresh = claims(iat=int(NOW), nbf=int(NOW), exp=int(NOW) + 60)
    check_claims(fresh, expect, NOW + offset)
    far = NOW + offset + (10 if offset > 0 else -10)
    with pytest.raises(AuthRefused) as exc:
        check_claims(fresh, expect, far)
    assert exc.value.reason == ("expired" if offset > 0 else "issued-in-future")
    assert ("clock is about 95 s ahead" if offset > 0 else "clock is behind") in exc.value.user_message


async def test_a_check_that_breaks_is_a_logged_refusal(validator: JWTValidator, ec_signer: Signer,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Failure injection: whatever a future check trips over (1e309 once raised
    OverflowError here), the login gets a refusal and the log a line, not a dropped link."""
    import meshsshd.auth as auth_module

    def broken(*_: Any) -> None:
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(auth_module, "check_claims", broken)
    caplog.set_level(logging.ERROR)
    exc = await refused(validator, ec_signer.sign(claims()))
    assert exc.reason == "internal-error"
    assert any(r.getMessage() == "auth.check-failed" for r in caplog.records)


async def test_leeway_admits_small_skew(validator: JWTValidator, ec_signer: Signer) -> None:
    token = ec_signer.sign(claims(exp=int(NOW) - 20, nbf=int(NOW) + 20, iat=int(NOW) + 20))
    assert (await validator.validate(token)).value == "alice@example.com"


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "nbf", "iat", "jti", "email"])
async def test_missing_claims(validator: JWTValidator, ed_signer: Signer, claim: str) -> None:
    exc = await refused(validator, ed_signer.sign(claims(**{claim: _DROP})))
    assert exc.reason == "missing-claim"
    assert f"`{claim}`" in exc.user_message


def test_check_claims_is_pure_and_uses_the_given_time() -> None:
    expect = ClaimExpectations(ISSUER, (AUDIENCE,), max_token_age=600, leeway=0)
    c = claims()
    check_claims(c, expect, NOW)  # fine now
    with pytest.raises(AuthRefused) as info:
        check_claims(c, expect, NOW + 3600)
    assert info.value.reason == "expired"
    assert info.value.user_message.startswith("token expired 3545 s ago")


# --- refused: replay, size, shape -----------------------------------------------------


async def test_replayed_jti(validator: JWTValidator, rsa_signer: Signer) -> None:
    token = rsa_signer.sign(claims())
    await validator.validate(token)
    exc = await refused(validator, token)
    assert exc.reason == "replayed"
    assert "already used" in exc.user_message
    # Another token with a fresh jti still works.
    await validator.validate(rsa_signer.sign(claims()))


async def test_replay_is_checked_after_the_signature(validator: JWTValidator, rsa_signer: Signer,
                                                     other_rsa: Signer) -> None:
    """A forged token carrying a used jti must not learn that the jti was used."""
    c = claims()
    await validator.validate(rsa_signer.sign(c))
    exc = await refused(validator, other_rsa.sign(c))
    assert exc.reason == "bad-signature"


async def test_concurrent_use_of_one_token_lets_exactly_one_in(validator: JWTValidator,
                                                                 ec_signer: Signer) -> None:
    token = ec_signer.sign(claims())
    results = await asyncio.gather(*(validator.validate(token) for _ in range(5)), return_exceptions=True)
    assert sum(isinstance(r, Identity) for r in results) == 1
    assert sorted(r.reason for r in results if isinstance(r, AuthRefused)) == ["replayed"] * 4


def test_replay_cache_entries_expire_and_it_is_bounded() -> None:
    cache = _ReplayCache(max_entries=3)
    for i in range(3):
        cache.add(("iss", f"j{i}"), until=NOW + 60, now=NOW)
    assert cache.seen(("iss", "j1"), NOW)
    with pytest.raises(AuthRefused) as info:
        cache.add(("iss", "j3"), until=NOW + 60, now=NOW)
    assert info.value.reason == "replay-cache-full"
    # Once the earlier tokens could no longer be accepted anyway, their entries go.
    cache.add(("iss", "j3"), until=NOW + 200, now=NOW + 61)
    assert len(cache) == 1 and not cache.seen(("iss", "j1"), NOW + 61)


async def test_replay_entry_outlives_the_tokens_validity(validator: JWTValidator, clock: Clock,
                                                         ed_signer: Signer) -> None:
    token = ed_signer.sign(claims())
    await validator.validate(token)
    clock.now += 80  # exp (+55) + leeway (30) not yet passed: still a replay
    assert (await refused(validator, token)).reason == "replayed"
    clock.now += 10  # now the token is expired, which is the reason given
    assert (await refused(validator, token)).reason == "expired"


async def test_one_mebibyte_token_is_refused_unread(validator: JWTValidator) -> None:
    token = "a" * (1024 * 1024)
    exc = await refused(validator, token)
    assert exc.reason == "too-large"
    assert str(MAX_TOKEN_BYTES) in exc.user_message
    assert validator.key_store.fetches == 0  # nothing was looked up for it


async def test_token_just_under_the_limit_is_read(validator: JWTValidator, ec_signer: Signer) -> None:
    token = ec_signer.sign(claims(pad="x" * 10_000))
    assert len(token) < MAX_TOKEN_BYTES
    assert (await validator.validate(token)).value == "alice@example.com"


@pytest.mark.parametrize("token", [
    pytest.param("hunter2", id="plain-password"),
    pytest.param("a.b", id="two-parts"),
    pytest.param("!!!.e30.", id="header-not-base64"),
    pytest.param(f"{b64(b'[1]')}.e30.", id="header-not-object"),
    pytest.param("pässword.x.y", id="not-ascii"),
])
async def test_malformed(validator: JWTValidator, token: str) -> None:
    exc = await refused(validator, token)
    assert exc.reason == "malformed"


async def test_payload_not_json_after_a_good_signature(validator: JWTValidator, ed_signer: Signer) -> None:
    token = jwt.api_jws.encode(b"not json", ed_signer.key, algorithm="EdDSA", headers={"kid": ed_signer.kid})
    exc = await refused(validator, token)
    assert exc.reason == "malformed"


async def test_no_token_text_in_logs(validator: JWTValidator, other_rsa: Signer, rsa_signer: Signer,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = [other_rsa.sign(claims()), rsa_signer.sign(claims(), kid="nope"), rsa_signer.sign(claims())]
    for token in tokens:
        try:
            await validator.validate(token)
        except AuthRefused:
            pass
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for token in tokens:
        assert token not in text
        assert token.split(".")[2] not in text


# --- keys: unknown kid, refresh, sources ----------------------------------------------


async def test_unknown_kid_refreshes_once_rate_limited(tmp_path: Path, clock: Clock, rsa_signer: Signer,
                                                       ec_signer: Signer) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_signer.jwk()]}))
    v = JWTValidator(JWTSettings(issuer=ISSUER, audience=(AUDIENCE,), jwks_file=path), clock=clock, started=STARTED)
    await v.validate(rsa_signer.sign(claims()))
    assert v.key_store.fetches == 1

    exc = await refused(v, ec_signer.sign(claims()))  # ec-1 is not published yet
    assert exc.reason == "unknown-kid"
    assert "ec-1" in exc.user_message
    assert v.key_store.fetches == 2  # one forced refresh

    path.write_text(json.dumps({"keys": [rsa_signer.jwk(), ec_signer.jwk()]}))
    clock.now += REFRESH_COOLDOWN - 1
    exc = await refused(v, ec_signer.sign(claims()))  # within the cooldown: no refresh
    assert exc.reason == "unknown-kid"
    assert v.key_store.fetches == 2

    clock.now += 2
    assert (await v.validate(ec_signer.sign(claims()))).method == "jwt"
    assert v.key_store.fetches == 3
    await v.close()


@pytest.mark.parametrize("doc, why", [
    pytest.param(None, "missing", id="file-missing"),
    pytest.param("{not json", "not JSON", id="not-json"),
    pytest.param({"keys": []}, "no usable", id="empty"),
    pytest.param({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}, "no usable", id="only-hmac-secret"),
])
async def test_no_keys(tmp_path: Path, clock: Clock, ec_signer: Signer, doc: Any, why: str) -> None:
    path = tmp_path / "jwks.json"
    if doc is not None:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    v = JWTValidator(JWTSettings(issuer=ISSUER, audience=(AUDIENCE,), jwks_file=path), clock=clock, started=STARTED)
    exc = await refused(v, ec_signer.sign(claims()))
    assert exc.reason == "no-keys"
    assert "jwks" in exc.user_message.lower()


def test_jwks_parsing_skips_unusable_keys(rsa_signer: Signer, ed_signer: Signer) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    small_jwk = json.loads(jwt.get_algorithm_by_name("RS256").to_jwk(small.public_key()))
    private_jwk = json.loads(jwt.get_algorithm_by_name("EdDSA").to_jwk(ed_signer.key))
    doc = {"keys": [
        {**small_jwk, "kid": "small"},
        {**private_jwk, "kid": "private"},
        {**rsa_signer.jwk(), "use": "enc", "kid": "enc"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**rsa_signer.jwk(), "alg": "HS256", "kid": "lying"},
        rsa_signer.jwk(),
    ]}
    keys = parse_jwks(doc, source="test")
    assert [k.kid for k in keys] == ["rsa-1"]
    assert keys[0].algs == {"RS256", "RS384", "RS512", "PS256"}
    with pytest.raises(JWKSError):
        parse_jwks({"keys": doc["keys"][:5]}, source="test")


@pytest.mark.parametrize("header, ttl", [
    pytest.param(None, DEFAULT_TTL, id="absent"),
    pytest.param("public, max-age=3600", 3600.0, id="max-age"),
    pytest.param("max-age=5", MIN_TTL, id="clamped-low"),
    pytest.param("max-age=99999999", MAX_TTL, id="clamped-high"),
    pytest.param("no-store", MIN_TTL, id="no-store"),
    pytest.param("public", DEFAULT_TTL, id="no-max-age"),
    pytest.param("s-maxage=10, max-age=900", 900.0, id="s-maxage-ignored"),
])
def test_cache_control(header: str | None, ttl: float) -> None:
    assert ttl_from_cache_control(header) == ttl


async def test_tokens_issued_before_the_validator_started_are_refused(clock: Clock, ed_signer: Signer) -> None:
    """Its replay cache is new (a restart): it cannot know whether an older token was used."""
    v = JWTValidator(JWTSettings(issuer=ISSUER, audience=(AUDIENCE,), jwks={"keys": [ed_signer.jwk()]}),
                     clock=clock)  # started now, at NOW
    exc = await refused(v, ed_signer.sign(claims()))  # issued at NOW - 5
    assert exc.reason == "issued-before-start" and "run the command again" in exc.user_message
    assert (await v.validate(ed_signer.sign(claims(iat=int(NOW), nbf=int(NOW))))).method == "jwt"


async def test_inline_jwks_and_update_keeps_the_replay_cache(clock: Clock, rsa_signer: Signer,
                                                             ed_signer: Signer) -> None:
    v = JWTValidator(JWTSettings(issuer=ISSUER, audience=(AUDIENCE,), jwks={"keys": [rsa_signer.jwk()]}),
                     clock=clock, started=STARTED)
    token = rsa_signer.sign(claims())
    await v.validate(token)
    # Managed mode: unknown kid does not fetch anything, new keys come with a new map.
    assert (await refused(v, ed_signer.sign(claims()))).reason == "unknown-kid"

    v.update(JWTSettings(issuer=ISSUER, audience=(AUDIENCE,),
                         jwks={"keys": [rsa_signer.jwk(), ed_signer.jwk()]}))
    assert (await v.validate(ed_signer.sign(claims()))).method == "jwt"
    assert (await refused(v, token)).reason == "replayed"

    v.update(JWTSettings(issuer=ISSUER, audience=("another-peer-id",), jwks={"keys": [ed_signer.jwk()]}))
    assert (await refused(v, ed_signer.sign(claims()))).reason == "wrong-audience"
    assert (await refused(v, rsa_signer.sign(claims(aud="another-peer-id")))).reason == "unknown-kid"
    await v.close()


# --- keys over HTTP: a real aiohttp server --------------------------------------------


class JWKSServer:
    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"keys": []}
        self.status = 200
        self.cache_control: str | None = "max-age=120"
        self.hits = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        if self.status != 200:
            return web.Response(status=self.status, text="oops")
        return web.json_response(self.doc, headers=headers)


@pytest.fixture
async def jwks_server() -> AsyncIterator[tuple[JWKSServer, str]]:
    state = JWKSServer()
    app = web.Application()
    app.router.add_get("/oauth/jwks", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield state, f"http://127.0.0.1:{port}/oauth/jwks"
    await runner.cleanup()


@pytest.fixture
async def url_validator(jwks_server: tuple[JWKSServer, str],
                        clock: Clock) -> AsyncIterator[Callable[[], JWTValidator]]:
    _, url = jwks_server
    made: list[JWTValidator] = []

    def make() -> JWTValidator:
        v = JWTValidator(JWTSettings(issuer=ISSUER, audience=(AUDIENCE,), jwks_url=url), clock=clock, started=STARTED)
        made.append(v)
        return v

    yield make
    for v in made:
        await v.close()


async def test_jwks_url_with_kid_rotation(jwks_server: tuple[JWKSServer, str], url_validator: Callable[[], JWTValidator],
                                          clock: Clock, rsa_signer: Signer, ec_signer: Signer,
                                          ed_signer: Signer) -> None:
    server, _ = jwks_server
    v = url_validator()
    server.doc = {"keys": [rsa_signer.jwk()]}
    await v.validate(rsa_signer.sign(claims()))
    assert server.hits == 1
    await v.validate(rsa_signer.sign(claims()))
    assert server.hits == 1  # cached

    # The issuer rotates to a new key; the first token with the new kid triggers one fetch.
    server.doc = {"keys": [ec_signer.jwk(), rsa_signer.jwk()]}
    assert (await v.validate(ec_signer.sign(claims()))).method == "jwt"
    assert server.hits == 2

    # A kid nobody publishes: refused, and no fetch within the cooldown.
    clock.now += 5
    assert (await refused(v, ed_signer.sign(claims()))).reason == "unknown-kid"
    assert server.hits == 2
    clock.now += REFRESH_COOLDOWN
    assert (await refused(v, ed_signer.sign(claims()))).reason == "unknown-kid"
    assert server.hits == 3

    # The old key is withdrawn; after max-age (120 s) the cached set is refreshed.
    server.doc = {"keys": [ec_signer.jwk()]}
    clock.now += 121
    exc = await refused(v, rsa_signer.sign(claims(iat=int(clock.now), nbf=int(clock.now), exp=int(clock.now) + 60)))
    assert exc.reason == "unknown-kid"
    assert server.hits == 5  # the expiry reload, then the one forced refresh for the unknown kid


async def test_jwks_url_honours_max_age(jwks_server: tuple[JWKSServer, str], url_validator: Callable[[], JWTValidator],
                                        clock: Clock, ec_signer: Signer) -> None:
    server, _ = jwks_server
    server.doc = {"keys": [ec_signer.jwk()]}
    server.cache_control = "public, max-age=600"
    v = url_validator()

    def fresh() -> dict[str, Any]:
        now = int(clock.now)
        return claims(iat=now, nbf=now, exp=now + 60)

    await v.validate(ec_signer.sign(fresh()))
    clock.now += 599
    await v.validate(ec_signer.sign(fresh()))
    assert server.hits == 1
    clock.now += 2
    await v.validate(ec_signer.sign(fresh()))
    assert server.hits == 2


async def test_jwks_url_down(jwks_server: tuple[JWKSServer, str], url_validator: Callable[[], JWTValidator],
                             clock: Clock, ec_signer: Signer) -> None:
    server, _ = jwks_server
    server.doc = {"keys": [ec_signer.jwk()]}
    server.status = 503
    v = url_validator()
    assert (await refused(v, ec_signer.sign(claims()))).reason == "no-keys"
    # Not hammered: the next login within a few seconds does not fetch again.
    assert (await refused(v, ec_signer.sign(claims()))).reason == "no-keys"
    assert server.hits == 1

    server.status = 200
    clock.now += 10
    await v.validate(ec_signer.sign(claims(iat=int(clock.now), nbf=int(clock.now))))
    assert server.hits == 2

    # Later the server fails again: the stale keys keep working.
    server.status = 500
    clock.now += 200
    now = int(clock.now)
    await v.validate(ec_signer.sign(claims(iat=now, nbf=now, exp=now + 60)))
    assert server.hits == 3
