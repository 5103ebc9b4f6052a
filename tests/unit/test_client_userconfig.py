"""config.toml: the defaults it gives, below options and environment variables, and the
refusal of what does not fit (file and key named)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshssh_client import control, userconfig
from meshssh_client.errors import UsageError
from meshssh_client.target import choose_source_address, default_login, local_username


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MESHSSH_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("MESHSSH_SOURCE_ADDRESS", raising=False)
    monkeypatch.delenv(control.PERSIST_ENV, raising=False)
    return tmp_path / "config.toml"


def test_no_file_means_the_built_in_defaults(conf: Path) -> None:
    assert userconfig.load() == userconfig.ClientConfig()
    assert default_login() == local_username()
    assert control.persist_seconds(userconfig.load().control_persist) == control.DEFAULT_PERSIST


def test_options_then_environment_then_file(conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf.write_text('user = "alice"\nsource_address = "100.64.0.9"\ncontrol_persist = 30\n')
    env = {"MESHSSHD_STATUS_FILE": str(conf.parent / "none.json")}
    assert default_login() == "alice"
    assert choose_source_address(None, "http://m", env) == "100.64.0.9"
    assert choose_source_address(None, "http://m", {**env, "MESHSSH_SOURCE_ADDRESS": "100.64.0.8"}) == "100.64.0.8"
    assert choose_source_address("100.64.0.7", "http://m", env) == "100.64.0.7"
    assert control.persist_seconds(userconfig.load().control_persist) == 30
    monkeypatch.setenv(control.PERSIST_ENV, "5")
    assert control.persist_seconds(userconfig.load().control_persist) == 5


@pytest.mark.parametrize("text, message", [
    ('usr = "x"', "unknown key `usr` (did you mean `user`?)"),
    ('user = 3', "key `user`: expected `str | null`, got `int`"),
    ('source_address = "laptop"', "source_address 'laptop' is not an IP address"),
    ("control_persist = nan", "key `control_persist`: expected `float` >= 0.0"),
    ('management_url = "mgmt.example.com"', "is not an http(s) URL"),
    ("user = ", "not valid TOML"),
])
def test_what_does_not_fit_is_refused_by_file_and_key(conf: Path, text: str, message: str) -> None:
    conf.write_text(text + "\n")
    with pytest.raises(UsageError) as err:
        userconfig.load()
    assert str(err.value).startswith(f"{conf}: ") and message in str(err.value)
