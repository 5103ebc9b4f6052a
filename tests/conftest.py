from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .support import os_user, require_root

CLEAN_ENV_KEYS = (
    "SSH_AUTH_SOCK", "MESHSSH_SOURCE_ADDRESS", "MESHSSH_CONFIG_DIR", "MESHSSHD_STATUS_FILE",
    "MESHSSH_MANAGEMENT_URL", "MESHSSH_SSH_JWT_CACHE_TTL", "MESHSSH_INSTALL_SCOPE",
    "MESHSSH_SSH_CONFIG_DIR", "MESHSSH_NO_BROWSER", "MESHSSH_DELEGATE_TO",
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not pick up the developer's agent, login or config by accident."""
    for key in CLEAN_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def make_user() -> Iterator[Callable[..., object]]:
    """Factory for throwaway OS users, all removed at teardown."""
    stack = []

    def make(prefix: str = "mst"):
        cm = os_user(prefix)
        user = cm.__enter__()
        stack.append(cm)
        return user

    yield make
    while stack:
        stack.pop().__exit__(None, None, None)


@pytest.fixture(scope="session")
def session_user() -> Iterator[object]:
    """One throwaway user shared by a whole run, for tests that only read."""
    require_root()
    with os_user("mss") as user:
        yield user
