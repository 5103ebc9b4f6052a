"""Token rules of the client: cache lifetimes, device-flow polling, exchange answers."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading

import pytest

from meshssh_client import state
from meshssh_client.auth import (SSH_MARGIN, TokenCache, device_poll_step, jwt_claims, parse_exchange,
                         parse_ttl, token_expiry)
from meshssh_client.errors import ClientError


def fake_jwt(claims: dict) -> str:
    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{b64({'alg': 'EdDSA'})}.{b64(claims)}.sig"


NOW = 1_000_000.0


@pytest.mark.parametrize("exp, stored, ttl, at, hit", [
    pytest.param(NOW + 60, NOW, None, NOW + 1, True, id="fresh"),
    pytest.param(NOW + 60, NOW, None, NOW + 60 - SSH_MARGIN - 1, True, id="just-before-margin"),
    pytest.param(NOW + 60, NOW, None, NOW + 60 - SSH_MARGIN, False, id="inside-margin"),
    pytest.param(NOW + 60, NOW, None, NOW + 61, False, id="expired"),
    pytest.param(NOW + 60, NOW, 0, NOW + 1, False, id="ttl-zero-never"),
    pytest.param(NOW + 60, NOW, 10, NOW + 9, True, id="within-ttl"),
    pytest.param(NOW + 60, NOW, 10, NOW + 10, False, id="ttl-bounds-before-exp"),
    pytest.param(NOW + 60, NOW, 3600, NOW + 50, False, id="ttl-cannot-outlive-exp"),
])
def test_token_cache_lifetimes(exp: float, stored: float, ttl: float | None, at: float, hit: bool) -> None:
    c = TokenCache({"p1": {"token": "t", "exp": exp, "stored": stored}})
    assert (c.get("p1", at, ttl) == "t") is hit


def test_token_cache_put_pop_prune() -> None:
    c = TokenCache()
    c.put("a", "t", NOW + 60, NOW, 0)
    assert c.entries == {}  # ttl 0: nothing is ever stored
    c.put("a", "t", NOW + 60, NOW, None)
    c.put("b", "u", NOW + 5, NOW, None)
    c.prune(NOW)
    assert set(c.entries) == {"a"}
    c.pop("a")
    assert c.get("a", NOW, None) is None


@pytest.mark.parametrize("value, expect", [(None, None), ("", None), ("0", 0.0), ("30", 30.0), (5, 5.0)])
def test_parse_ttl(value, expect) -> None:
    assert parse_ttl(value) == expect


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_parse_ttl_errors(value: str) -> None:
    with pytest.raises(ClientError):
        parse_ttl(value)


@pytest.mark.parametrize("status, doc, interval, expect", [
    pytest.param(200, {"access_token": "a", "refresh_token": "r"}, 5, ("tokens", None), id="done"),
    pytest.param(400, {"error": "authorization_pending"}, 5, ("wait", 5), id="pending-keeps-interval"),
    pytest.param(400, {"error": "slow_down"}, 5, ("wait", 10), id="slow-down-adds-5"),
    pytest.param(400, {"error": "expired_token"}, 5, ("error", "expired"), id="expired"),
    pytest.param(400, {"error": "access_denied"}, 5, ("error", "denied"), id="denied"),
    pytest.param(500, {"error": "server_error", "error_description": "boom"}, 5, ("error", "boom"), id="other"),
])
def test_device_poll_step(status: int, doc: dict, interval: float, expect: tuple) -> None:
    step = device_poll_step(status, doc, interval)
    kind, detail = expect
    if kind == "tokens":
        assert step.tokens == doc
    elif kind == "wait":
        assert step.error is None and step.tokens is None and step.interval == detail
    else:
        assert step.error and detail in step.error


def test_jwt_claims_and_expiry() -> None:
    tok = fake_jwt({"exp": NOW + 42, "email": "a@b"})
    assert jwt_claims(tok)["email"] == "a@b"
    assert token_expiry(tok, 999, NOW) == NOW + 42
    assert token_expiry("not-a-jwt", 60, NOW) == NOW + 60
    assert jwt_claims("x.!!!.y") == {}


def test_exchange_single_and_fanout() -> None:
    t1, t2 = fake_jwt({"exp": NOW + 60}), fake_jwt({"exp": NOW + 61})
    doc = {"access_token": t1, "expires_in": 60, "tokens": [{"peer": "id1", "name": "db-1", "access_token": t1}]}
    out = parse_exchange(200, doc, [("id1", "db-1")], "alice@example.com", NOW)
    assert out["id1"].token == t1 and out["id1"].exp == NOW + 60
    doc = {"tokens": [
        {"peer": "id1", "name": "db-1", "access_token": t1, "expires_in": 60},
        {"peer": "id2", "error": "access_denied", "error_description": "no policy lets alice@example.com reach web-1"},
        {"peer": "id3", "name": "x", "access_token": t2},
    ]}
    out = parse_exchange(200, doc, [("id1", "db-1"), ("id2", "web-1"), ("id4", "gone")], "alice@example.com", NOW)
    assert out["id1"].token == t1
    assert out["id2"].error == "no policy lets alice@example.com reach web-1"
    assert "id3" not in out  # not asked for
    assert out["id4"].error  # asked, not answered


@pytest.mark.parametrize("status, doc, message", [
    (403, {"error": "access_denied", "error_description": "db-1 is not SSH-enabled (an admin turns it on: meshmgmt peers ssh db-1 on)"},
     "db-1 is not SSH-enabled (an admin turns it on: meshmgmt peers ssh db-1 on)"),
    (403, {"error": "access_denied"}, "no policy lets alice@example.com reach db-1"),
    (400, {"error": "invalid_target", "error_description": "unknown peer db-1"}, "unknown peer db-1"),
    (500, {}, "no policy lets"),
])
def test_exchange_refusals_name_the_reason(status: int, doc: dict, message: str) -> None:
    out = parse_exchange(status, doc, [("db-1", "db-1")], "alice@example.com", NOW)
    assert message in out["db-1"].error


def test_state_files_are_private_and_atomic(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MESHSSH_CONFIG_DIR", str(tmp_path / "cfg"))
    assert state.config_dir() == tmp_path / "cfg"
    state.write_json("login.json", {"refresh_token": "x"})
    st = os.stat(tmp_path / "cfg" / "login.json")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "cfg").st_mode) == 0o700
    assert state.read_json("login.json") == {"refresh_token": "x"}
    assert [p.name for p in (tmp_path / "cfg").iterdir()] == ["login.json"]  # no temp left over
    (tmp_path / "cfg" / "bad.json").write_text("{")
    assert state.read_json("bad.json") is None
    assert state.remove("login.json") and not state.remove("login.json")


def test_config_dir_defaults(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MESHSSH_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert state.config_dir() == tmp_path / "xdg" / "meshssh"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state.config_dir() == tmp_path / ".config" / "meshssh"


def test_lock_serialises(tmp_path) -> None:
    order = []

    def second() -> None:
        with state.locked(tmp_path):
            order.append("b")

    with state.locked(tmp_path):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.3)
        order.append("a")
    t.join(5)
    assert order == ["a", "b"]
