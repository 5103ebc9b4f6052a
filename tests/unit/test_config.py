"""meshsshd/config.py: the standalone config file is checked whole against one schema
(issue 13). Each refusal is one line naming the file, the key path and what was
expected, with the nearest valid key for a misspelt one; what fits keeps the defaults
and types the server has always read."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshsshd.config import Limits, ServerSettings, find_sftp_server, settings_from_dict, settings_from_toml
from meshsshd.errors import ConfigError

BASE = "disable_auth = true\n"
RULE = '[[access]]\nsources = ["10.0.0.0/8"]\nidentities = ["*"]\nlocal_users = ["*"]\n'


@pytest.mark.parametrize("toml, message", [
    # wrong types: once accepted and every login then silently dropped
    pytest.param('[limits]\nmax_sessions = "ten"', "key `limits.max_sessions`: expected `int`, got `str`",
                 id="bad-type-in-a-table"),
    pytest.param('sftp = "yes"', "key `sftp`: expected `bool`, got `str`", id="bad-type-top-level"),
    pytest.param('[jwt]\naudience = 5', "key `jwt.audience`: expected `str | array`, got `int`",
                 id="bad-type-either-form"),
    pytest.param("limits = 3", "key `limits`: expected `object`, got `int`", id="scalar-for-a-table"),
    # unknown keys at every level, with the nearest valid one
    pytest.param("sftp_sever = \"/x\"", "unknown key `sftp_sever` (did you mean `sftp_server`?)",
                 id="unknown-top-level"),
    pytest.param("[limits]\nmax_sesions = 3",
                 "unknown key `limits.max_sesions` (did you mean `limits.max_sessions`?)", id="unknown-in-limits"),
    pytest.param("[jwt]\nleway = 30", "unknown key `jwt.leway` (did you mean `jwt.leeway`?)", id="unknown-in-jwt"),
    pytest.param(RULE + "\n[[access]]\nsorces = []",
                 "unknown key `access[1].sorces` (did you mean `access[1].sources`?)", id="unknown-in-access-item"),
    pytest.param("[limits]\nzzz = 1", "unknown key `limits.zzz`", id="unknown-nothing-near"),
    # bounds, stated in the schema's types
    pytest.param("[limits]\nmax_sessions = 0", "key `limits.max_sessions`: expected `int` >= 1", id="zero-count"),
    pytest.param("[limits]\nkeepalive_count_max = 0", "key `limits.keepalive_count_max`: expected `int` >= 1",
                 id="zero-keepalive-count"),
    pytest.param("[limits]\nper_source_max_startups = -1",
                 "key `limits.per_source_max_startups`: expected `int` >= 0", id="negative-quota"),
    pytest.param("[limits]\nmax_startups = [10, 101, 100]", "key `limits.max_startups[1]`: expected `int` <= 100",
                 id="percent-above-100"),
    pytest.param("[limits]\nmax_startups = [10, 30]", "key `limits.max_startups`: expected `array` of length 3, got 2",
                 id="tuple-length"),
    pytest.param("[limits]\nmax_startups = [50, 30, 20]",
                 "key `limits`: max_startups' start (50) is above its full (20): write start:rate:full with "
                 "start <= full, as OpenSSH's MaxStartups", id="start-above-full"),
    pytest.param("[limits]\ndial_timeout = 0", "key `limits.dial_timeout`: expected `float` > 0.0", id="zero-timeout"),
    pytest.param("[jwt]\nleeway = nan", "key `jwt.leeway`: expected `float` >= 0.0", id="nan-duration"),
    pytest.param("[jwt]\nmax_token_age = inf", "key `jwt.max_token_age`: expected `float` <= 9007199254740992.0",
                 id="infinite-duration"),
    pytest.param("[jwt]\nmax_token_age = -1", "key `jwt.max_token_age`: expected `float` >= 0.0",
                 id="negative-duration"),
    pytest.param('nologin_files = ["nologin"]',
                 "key `nologin_files[0]`: expected an absolute path (starting with `/`)", id="relative-path"),
    pytest.param('state_dir = "/var/lib/\\u0000"', "key `state_dir`: expected a string without NUL characters",
                 id="nul-in-a-path"),
    pytest.param('listen = []', "key `listen`: expected `array` of length >= 1", id="no-listen-address"),
    # an access-rule list item: its shape by the schema, its CIDRs by AccessRule
    pytest.param('[[access]]\nsources = "10.0.0.0/8"', "key `access[0].sources`: expected `array`, got `str`",
                 id="access-item-type"),
    pytest.param('[[access]]\nsources = ["10.0.0.0/8", 7]', "key `access[0].sources[1]`: expected `str`, got `int`",
                 id="access-item-entry-type"),
    pytest.param(RULE + '\n[[access]]\nsources = ["ten.0.0.0/8"]',
                 "key `access[1]`: access rule source 'ten.0.0.0/8' is not a CIDR", id="access-item-cidr"),
])
def test_a_bad_file_is_refused_with_file_key_and_expectation(tmp_path: Path, toml: str, message: str) -> None:
    # the keys under test come last so a [table] header does not capture BASE's keys
    path = tmp_path / "meshsshd.toml"
    path.write_text(BASE + toml + "\n")
    with pytest.raises(ConfigError) as err:
        settings_from_toml(path)
    assert str(err.value) == f"{path}: {message}"
    assert err.value.exit_code == 2


def test_no_message_is_a_python_error_or_spans_lines(tmp_path: Path) -> None:
    """The report of issue 13: `Limits.__init__() got an unexpected keyword argument`."""
    path = tmp_path / "meshsshd.toml"
    for toml in ("[limits]\nbogus = 1", "[limits]\nmax_sessions = 1\nmax_sessions = 2", "[limits\n"):
        path.write_text(BASE + toml + "\n")
        with pytest.raises(ConfigError) as err:
            settings_from_toml(path)
        text = str(err.value)
        assert text.startswith(f"{path}: ") and "\n" not in text and "__init__" not in text, text


def test_what_fits_keeps_the_server_defaults_and_types() -> None:
    assert settings_from_dict({"disable_auth": True}) == ServerSettings(disable_auth=True,
                                                                        sftp_server=find_sftp_server())
    limits = settings_from_dict({"disable_auth": True, "limits": {"login_grace": 5, "max_startups": [1, 0, 2]}}).limits
    assert limits == Limits(login_grace=5.0, max_startups=(1, 0, 2))
    assert isinstance(limits.login_grace, float) and isinstance(limits.max_startups, tuple)
    jwt = settings_from_dict({"jwt": {"issuer": "https://i", "audience": "peer", "jwks_url": "https://i/jwks"}}).jwt
    assert (jwt.audience, jwt.leeway, jwt.max_token_age) == (("peer",), 30.0, 600.0)


def test_a_dict_without_a_file_is_named_by_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^flags: unknown key `limits.max_sesions`"):
        settings_from_dict({"limits": {"max_sesions": 1}}, source="flags")
