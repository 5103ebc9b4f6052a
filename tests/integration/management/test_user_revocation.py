"""Admin changes to a user end that user's logins, against a real `meshmgmt serve`
(SQLite and PostgreSQL): a password change, a role change, a block and a delete each
revoke the user's refresh tokens, and a refused token says which change ended its login;
a rename or a role set to what it was does not, and unblocking revives nothing. Logins are real device flows approved on the HTML page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from .mgmtkit import Mgmt, call
from .test_idp_api import PASSWORD, _form_post, _login


@pytest.fixture
async def sessions(mgmt: Mgmt) -> AsyncIterator[tuple[aiohttp.ClientSession, aiohttp.ClientSession]]:
    """(the command-line client, a browser with cookies) against the server."""
    async with aiohttp.ClientSession(mgmt.url) as cli, \
            aiohttp.ClientSession(mgmt.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        yield cli, browser


async def _user(http: aiohttp.ClientSession, mgmt: Mgmt, email: str) -> str:
    _, doc = await call(http, "POST", mgmt.url + "/api/users", headers=mgmt.admin, expect=201,
                        json={"email": email, "password": PASSWORD})
    return doc["id"]


async def _update(http: aiohttp.ClientSession, mgmt: Mgmt, user_id: str, doc: dict[str, Any]) -> None:
    await call(http, "PUT", f"{mgmt.url}/api/users/{user_id}", headers=mgmt.admin, json=doc, expect=200)


async def _refresh(cli: aiohttp.ClientSession, token: str) -> tuple[int, dict[str, Any]]:
    return await _form_post(cli, "/oauth/token", {"grant_type": "refresh_token", "client_id": "meshssh",
                                                  "refresh_token": token})


@pytest.mark.parametrize(("change", "said"), [
    pytest.param({"password": PASSWORD + "-new"},
                 "this login was signed out when an administrator set a new password for your account", id="password"),
    pytest.param({"role": "admin"}, "this login was signed out when an administrator changed your role", id="role"),
    pytest.param({"blocked": True}, "your account is blocked by an administrator", id="block"),
])
async def test_a_change_revokes_every_login_of_the_user(mgmt: Mgmt, sessions: Any, change: dict[str, Any],
                                                        said: str) -> None:
    cli, browser = sessions
    email = f"{next(iter(change))}-{mgmt.database is not None}@example.com"
    user = await _user(cli, mgmt, email)
    first = (await _login(cli, browser, email))["refresh_token"]
    second = (await _login(cli, browser, email))["refresh_token"]  # another device, another family
    for harmless in ({"name": "Renamed"}, {"role": "user"}, {"blocked": False}):
        await _update(cli, mgmt, user, harmless)
    status, body = await _refresh(cli, first)
    assert status == 200, body
    first = body["refresh_token"]

    await _update(cli, mgmt, user, change)
    for token in (first, second):
        status, body = await _refresh(cli, token)
        assert (status, body["error"]) == (400, "invalid_grant"), body
        assert body["error_description"].startswith(said), body
        assert body["error_description"].count("meshssh login") == 1, body
    if change.get("blocked"):
        await _update(cli, mgmt, user, {"blocked": False})
        status, body = await _refresh(cli, second)
        assert status == 400, "unblocking must not revive a revoked login"
        assert body["error_description"].startswith(
            "this login was signed out when an administrator blocked your account"), body


async def test_deleting_a_user_ends_their_logins(mgmt: Mgmt, sessions: Any) -> None:
    cli, browser = sessions
    email = f"gone-{mgmt.database is not None}@example.com"
    user = await _user(cli, mgmt, email)
    token = (await _login(cli, browser, email))["refresh_token"]
    await call(cli, "DELETE", f"{mgmt.url}/api/users/{user}", headers=mgmt.admin, expect=204)
    status, body = await _refresh(cli, token)
    assert (status, body["error"]) == (400, "invalid_grant"), body
