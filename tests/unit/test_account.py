"""Account expiry and nologin decisions (pure), and reading them from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshsshd.account import (NOLOGIN_DEFAULT_TEXT, AccountState, AccountUnreadable, decide, read_account_sync,
                              shadow_expiry)
from meshsshd.users import LocalUser

TODAY = 20_000   # 2024-10-04
ALICE = LocalUser("alice", 1000, 1000, "/home/alice", "/bin/bash", (1000,))


@pytest.mark.parametrize(("state", "is_root", "reason"), [
    pytest.param(AccountState(), False, "allowed", id="nothing-set"),
    pytest.param(AccountState(expire_day=TODAY + 1), False, "allowed", id="expires-tomorrow"),
    pytest.param(AccountState(expire_day=TODAY), False, "account-expired", id="expires-today"),
    pytest.param(AccountState(expire_day=1), False, "account-expired", id="usermod-expiredate-1"),
    pytest.param(AccountState(expire_day=0), False, "account-expired", id="zero-counts-as-expired"),
    pytest.param(AccountState(expire_day=1), True, "account-expired", id="root-expires-too"),
    pytest.param(AccountState(nologin="maintenance"), False, "nologin", id="nologin"),
    pytest.param(AccountState(nologin="maintenance"), True, "allowed", id="nologin-spares-root"),
    pytest.param(AccountState(expire_day=1, nologin="x"), True, "account-expired", id="expired-root-under-nologin"),
    pytest.param(AccountState(error="permission denied"), False, "account-unreadable", id="fail-closed"),
])
def test_decide(state: AccountState, is_root: bool, reason: str) -> None:
    decision = decide(state, is_root=is_root, today=TODAY)
    assert decision.reason == reason
    assert decision.allowed is (reason == "allowed")


def test_nologin_message_is_the_files_text_or_a_default() -> None:
    assert decide(AccountState(nologin="Back at 21:00.\n"), is_root=False, today=TODAY).message == "Back at 21:00."
    assert decide(AccountState(nologin=" \n"), is_root=False, today=TODAY).message == NOLOGIN_DEFAULT_TEXT


SHADOW = """root:*:19000:0:99999:7:::
alice:$y$j9T$hash:19000:0:99999:7::19500:
bob:!:19000:0:99999:7:::
carol:*:19000::::::
dave:*:19000:0:99999:7::-1:
eve:*:19000:0:99999:7::soon:
short:*:19000
"""


@pytest.mark.parametrize(("name", "expected"), [
    pytest.param("alice", 19500, id="set"),
    pytest.param("bob", None, id="empty-field-never"),
    pytest.param("carol", None, id="empty-aging-fields"),
    pytest.param("dave", None, id="minus-one-never"),
    pytest.param("short", None, id="truncated-line"),
    pytest.param("nobody", None, id="no-entry"),
    pytest.param("ali", None, id="prefix-is-not-a-match"),
])
def test_shadow_expiry(name: str, expected: int | None) -> None:
    assert shadow_expiry(SHADOW, name) == expected


def test_a_garbled_expiry_fails_closed_without_showing_the_hash() -> None:
    with pytest.raises(AccountUnreadable, match="'soon' is not a number") as info:
        shadow_expiry(SHADOW, "eve")
    assert "$y$" not in str(info.value)


def test_read_account_from_files(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text(SHADOW)
    first, second = tmp_path / "nologin", tmp_path / "run-nologin"
    assert read_account_sync(ALICE, [first, second], shadow) == AccountState(expire_day=19500)
    second.write_text("shutting down\n")
    assert read_account_sync(ALICE, [first, second], shadow).nologin == "shutting down\n"
    first.write_text("maintenance\n")
    assert read_account_sync(ALICE, [first, second], shadow).nologin == "maintenance\n"   # the first found
    assert read_account_sync(ALICE, [], tmp_path / "absent") == AccountState()
    garbled = tmp_path / "garbled"
    garbled.write_text("alice:*:1:::::x:\n")
    assert read_account_sync(ALICE, [], garbled).error is not None
