"""Access rules: a table of who may log in as whom from where, and why not."""

from __future__ import annotations

import pytest

from meshsshd.acl import AccessResult, evaluate, is_valid_login, localpart
from meshsshd.auth import Identity, key_identity, peer_identity
from meshsshd.netmap import AccessRule

ALICE = Identity(value="alice@example.com", method="jwt", claims={"email": "alice@example.com"})
BOB = Identity(value="bob@example.com", method="jwt", claims={})
ROOT_PERSON = Identity(value="root@example.com", method="jwt", claims={})
ALICE_TOKEN_USERS = Identity(value="alice@example.com", method="jwt", claims={},
                             local_users=("alice", "deploy"))
ALICE_TOKEN_STAR = Identity(value="alice@example.com", method="jwt", claims={}, local_users=("*",))
ALICE_TOKEN_ROOT = Identity(value="alice@example.com", method="jwt", claims={}, local_users=("root",))
ALICE_TOKEN_NONE = Identity(value="alice@example.com", method="jwt", claims={}, local_users=())
ODD_LOCALPART = Identity(value="Alice.Smith@example.com", method="jwt", claims={})
KEY = key_identity("SHA256:abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG")
PEER = peer_identity("100.64.0.7")

MESH = "100.64.0.0/10"
R_ALICE = AccessRule(sources=(MESH,), identities=("alice@example.com",), local_users=("alice", "deploy"))
R_LOCALPART = AccessRule(sources=(MESH,), identities=("*",), local_users=("localpart",))
R_ANY = AccessRule(sources=(MESH,), identities=("*",), local_users=("*",))
R_ROOT = AccessRule(sources=("100.64.0.7/32",), identities=("alice@example.com",), local_users=("root",))
R_KEY = AccessRule(sources=("127.0.0.0/8", "::1/128"), identities=(KEY.value,), local_users=("backup",))
R_V6 = AccessRule(sources=("fd00:1234::/48",), identities=("bob@example.com",), local_users=("bob",))

SRC = "100.64.0.7"
OTHER_SRC = "100.64.0.9"
OUTSIDE = "192.0.2.10"


CASES = [
    # allowed
    pytest.param([R_ALICE], SRC, ALICE, "alice", False, "allowed", 0, id="named-user"),
    pytest.param([R_ALICE], SRC, ALICE, "deploy", False, "allowed", 0, id="second-named-user"),
    pytest.param([R_LOCALPART], SRC, ALICE, "alice", False, "allowed", 0, id="localpart"),
    pytest.param([R_ANY], SRC, BOB, "postgres", False, "allowed", 0, id="star-any-non-root"),
    pytest.param([R_KEY], "127.0.0.1", KEY, "backup", False, "allowed", 0, id="key-fingerprint"),
    pytest.param([R_KEY], "::1", KEY, "backup", False, "allowed", 0, id="key-fingerprint-v6"),
    pytest.param([R_KEY], "::ffff:127.0.0.1", KEY, "backup", False, "allowed", 0, id="v4-mapped-source"),
    pytest.param([R_V6], "fd00:1234::5", BOB, "bob", False, "allowed", 0, id="ipv6-source"),
    pytest.param([R_ANY], SRC, PEER, "alice", False, "allowed", 0, id="disable-auth-peer-identity"),
    pytest.param([R_ROOT], SRC, ALICE, "root", True, "allowed", 0, id="root-named-and-on"),
    pytest.param([R_ANY, R_ALICE], SRC, ALICE, "alice", False, "allowed", 0, id="first-match-wins"),
    pytest.param([R_V6, R_KEY, R_ALICE], SRC, ALICE, "alice", False, "allowed", 2, id="later-rule-matches"),
    pytest.param([R_ALICE], SRC, ALICE_TOKEN_USERS, "deploy", False, "allowed", 0, id="token-users-allow"),
    pytest.param([R_ANY], SRC, ALICE_TOKEN_STAR, "www-data", False, "allowed", 0, id="token-users-star"),
    pytest.param([R_ROOT], SRC, ALICE_TOKEN_ROOT, "root", True, "allowed", 0, id="token-users-root-named"),
    # denied: nothing to match
    pytest.param([], SRC, ALICE, "alice", False, "no-rules", None, id="no-rules"),
    # denied: source
    pytest.param([R_ALICE], OUTSIDE, ALICE, "alice", False, "source", None, id="source-outside-mesh"),
    pytest.param([R_ROOT], OTHER_SRC, ALICE, "root", True, "source", None, id="source-other-peer"),
    pytest.param([R_ANY], "not-an-ip", ALICE, "alice", False, "source", None, id="source-garbage"),
    pytest.param([R_V6], "fd00:9999::5", BOB, "bob", False, "source", None, id="source-ipv6-outside"),
    pytest.param([AccessRule(sources=(), identities=("*",), local_users=("*",))], SRC, ALICE, "alice",
                 False, "source", None, id="rule-without-sources-matches-nothing"),
    # denied: identity
    pytest.param([R_ALICE], SRC, BOB, "alice", False, "identity", None, id="identity-mismatch"),
    pytest.param([R_ALICE], SRC, Identity("ALICE@example.com", "jwt", {}), "alice", False, "identity", None,
                 id="identity-is-case-sensitive"),
    pytest.param([R_KEY], "127.0.0.1", key_identity("SHA256:other"), "backup", False, "identity", None,
                 id="other-key"),
    pytest.param([R_ALICE], SRC, Identity("key:alice@example.com", "publickey", {}), "alice", False,
                 "identity", None, id="key-identity-not-a-jwt-identity"),
    # denied: local user
    pytest.param([R_ALICE], SRC, ALICE, "bob", False, "local-user", None, id="user-not-granted"),
    pytest.param([R_LOCALPART], SRC, BOB, "alice", False, "local-user", None, id="localpart-other"),
    pytest.param([R_LOCALPART], SRC, KEY, "sha256", False, "local-user", None, id="key-has-no-localpart"),
    pytest.param([R_LOCALPART], SRC, PEER, "peer", False, "local-user", None, id="peer-has-no-localpart"),
    pytest.param([R_LOCALPART], SRC, ODD_LOCALPART, "alice.smith", False, "local-user", None,
                 id="localpart-not-a-posix-name"),
    # denied: invalid names never reach the rules
    pytest.param([R_ANY], SRC, ALICE, "Alice", False, "local-user", None, id="uppercase-name"),
    pytest.param([R_ANY], SRC, ALICE, "-rf", False, "local-user", None, id="leading-dash"),
    pytest.param([R_ANY], SRC, ALICE, "9lives", False, "local-user", None, id="leading-digit"),
    pytest.param([R_ANY], SRC, ALICE, "", False, "local-user", None, id="empty-name"),
    pytest.param([R_ANY], SRC, ALICE, " alice", False, "local-user", None, id="leading-space"),
    pytest.param([R_ANY], SRC, ALICE, "alice\n", False, "local-user", None, id="trailing-newline"),
    pytest.param([R_ANY], SRC, ALICE, "../etc", False, "local-user", None, id="path"),
    pytest.param([R_ANY], SRC, ALICE, "a" * 33, False, "local-user", None, id="too-long"),
    pytest.param([R_ANY], SRC, ALICE, "a" * 32, False, "allowed", 0, id="longest-name"),
    pytest.param([R_ANY], SRC, ALICE, "machine$", False, "allowed", 0, id="samba-machine-name"),
    # root
    pytest.param([R_ANY], SRC, ALICE, "root", True, "root", None, id="star-never-covers-root"),
    pytest.param([R_LOCALPART], SRC, ROOT_PERSON, "root", True, "root", None, id="localpart-never-root"),
    pytest.param([R_ROOT], SRC, ALICE, "root", False, "root", None, id="root-named-but-off"),
    pytest.param([], SRC, ALICE, "root", False, "root", None, id="root-off-no-rules"),
    pytest.param([R_ROOT], SRC, BOB, "root", True, "identity", None, id="root-other-identity"),
    # the token's own local_users claim
    pytest.param([R_ANY], SRC, ALICE_TOKEN_USERS, "postgres", False, "token-users", None,
                 id="token-users-narrower-than-rule"),
    pytest.param([R_ALICE], SRC, ALICE_TOKEN_NONE, "alice", False, "token-users", None,
                 id="token-users-empty"),
    pytest.param([R_ROOT], SRC, ALICE_TOKEN_STAR, "root", True, "token-users", None,
                 id="token-users-star-not-root"),
    pytest.param([R_ALICE], SRC, ALICE_TOKEN_USERS, "bob", False, "local-user", None,
                 id="token-users-cannot-widen-rules"),
]


@pytest.mark.parametrize("rules, source, identity, login, root_login, reason, rule_index", CASES)
def test_evaluate(rules: list[AccessRule], source: str, identity: Identity, login: str, root_login: bool,
                  reason: str, rule_index: int | None) -> None:
    result = evaluate(rules, source, identity, login, root_login=root_login)
    assert result.reason == reason
    assert result.allowed is (reason == "allowed")
    assert result.rule_index == rule_index
    assert result.message
    assert "\n" not in result.message


def test_messages_say_what_is_wrong() -> None:
    assert evaluate([R_ALICE], SRC, ALICE, "bob", root_login=False).message == \
        "you may not log in as bob on this peer"
    assert evaluate([R_ROOT], SRC, ALICE, "root", root_login=False).message == \
        "root login is disabled on this peer"
    assert "alice@example.com" in evaluate([R_KEY], "127.0.0.1", ALICE, "backup", root_login=False).message


def test_result_is_a_value() -> None:
    a = evaluate([R_ALICE], SRC, ALICE, "alice", root_login=False)
    b = evaluate([R_ALICE], SRC, ALICE, "alice", root_login=False)
    assert a == b == AccessResult(True, "allowed", "allowed", 0)


@pytest.mark.parametrize("name, ok", [
    pytest.param("alice", True, id="plain"),
    pytest.param("_svc", True, id="underscore"),
    pytest.param("a-b_c9", True, id="mixed"),
    pytest.param("a.b", False, id="dot"),
    pytest.param("ALICE", False, id="upper"),
    pytest.param("a$b", False, id="dollar-inside"),
])
def test_is_valid_login(name: str, ok: bool) -> None:
    assert is_valid_login(name) is ok


def test_localpart() -> None:
    assert localpart(ALICE) == "alice"
    assert localpart(Identity("alice", "jwt", {})) == "alice"
    assert localpart(KEY) is None
    assert localpart(ODD_LOCALPART) is None
