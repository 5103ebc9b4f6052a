"""Which detached sessions a new policy ends (meshsshd/detached/_revoke.py, pure parts)."""

from __future__ import annotations

import pytest

from meshsshd.config import JWTSettings, ServerSettings
from meshsshd.detached._revoke import recorded_identity, revocation_reason
from meshsshd.netmap import AccessRule
from meshsshd.server import still_allowed

RULE = AccessRule(sources=("100.64.0.2/32",), identities=("alice@example.com",), local_users=("alice", "bob"))
SETTINGS = ServerSettings(authorized_keys=True, access=(RULE,), jwt=JWTSettings(
    issuer="https://i", audience=("p",), jwks={"keys": []}))
META = {"id": "a" * 12, "identity": "alice@example.com", "method": "jwt", "token_local_users": None,
        "local_user": "alice", "uid": 1000, "source": "100.64.0.2", "state": "running"}


def check(settings: ServerSettings):
    return lambda identity, login, source: still_allowed(settings, identity, login, source)


@pytest.mark.parametrize("change, settings, reason", [
    pytest.param({}, SETTINGS, "", id="still-allowed"),
    pytest.param({"source": "100.64.0.9"}, SETTINGS, "source", id="source-no-longer-covered"),
    pytest.param({"identity": "mallory@example.com"}, SETTINGS, "identity", id="identity-removed"),
    pytest.param({"local_user": "carol"}, SETTINGS, "local-user", id="login-no-longer-granted"),
    pytest.param({"token_local_users": ["bob"]}, SETTINGS, "token-users", id="token-fence-kept"),
    pytest.param({"uid": 0, "local_user": "toor"}, SETTINGS, "root", id="uid-0-is-root-whatever-the-name"),
    pytest.param({}, SETTINGS.with_(access=()), "no-rules", id="all-rules-gone"),
    pytest.param({}, SETTINGS.with_(disable_auth=True), "method", id="jwt-logins-off"),
])
def test_revocation_reason(change, settings, reason):
    assert revocation_reason({**META, **change}, check(settings)) == reason


def test_sessions_recorded_before_the_method_was_kept():
    assert recorded_identity({"identity": "key:SHA256:abc"}).method == "publickey"
    assert recorded_identity({"identity": "peer:100.64.0.2"}).method == "none"
    assert recorded_identity({"identity": "alice@example.com"}).method == "jwt"
    assert recorded_identity({"identity": "a", "token_local_users": ["x"]}).local_users == ("x",)
