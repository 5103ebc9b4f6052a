"""deploy/meshsshd.example.toml is valid and documents every key of the schema; key validation."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from meshsshd.config import ConfigFile, Limits, settings_from_dict, settings_from_toml
from meshsshd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "meshsshd.example.toml"


def test_example_parses_with_defaults():
    settings = settings_from_toml(EXAMPLE)
    assert settings.limits == Limits()
    assert settings.listen == (("127.0.0.1", 22022),)
    assert not (settings.sftp or settings.root_login or settings.disable_auth)


def _schema_keys(info: object) -> set[str]:
    """Every key of the config schema, at any depth (tables, arrays of tables)."""
    if isinstance(info, msgspec.inspect.UnionType):
        return set().union(*(_schema_keys(t) for t in info.types))
    if isinstance(info, msgspec.inspect.VarTupleType):
        return _schema_keys(info.item_type)
    if isinstance(info, msgspec.inspect.StructType):
        return {f.encode_name for f in info.fields}.union(*(_schema_keys(f.type) for f in info.fields))
    return set()


def test_example_mentions_every_key():
    text = EXAMPLE.read_text()
    mentioned = set(re.findall(r"^[#\s]*\[*([a-z_]+)\]*\s*=?", text, re.M))
    keys = _schema_keys(msgspec.inspect.type_info(ConfigFile))
    assert {"max_sessions", "leeway", "sources"} <= keys
    missing = keys - mentioned
    assert not missing, f"undocumented keys: {sorted(missing)}"


def _config(**extra: object) -> dict[str, object]:
    return {"disable_auth": True, **extra}


def test_accept_env_and_nologin_files_defaults_and_validation() -> None:
    settings = settings_from_dict(_config())
    assert settings.accept_env == ("LANG", "LC_*")
    assert settings.nologin_files == (Path("/etc/nologin"), Path("/run/nologin"))
    assert settings_from_dict(_config(accept_env=[])).accept_env == ()
    rule = {"sources": ["10.0.0.0/8"], "identities": ["*"], "local_users": ["*"], "accept_env": ["GIT_*"]}
    assert settings_from_dict(_config(access=[rule])).access[0].accept_env == ("GIT_*",)
    for bad, message in (
        (_config(accept_env=["LC_*", "LD PRELOAD"]), "accept_env: 'LD PRELOAD' is not a variable name pattern"),
        (_config(accept_env="LANG"), "key `accept_env`: expected `array`, got `str`"),
        (_config(access=[{**rule, "accept_env": ["A=B"]}]), "key `access[0]`: access rule accept_env: 'A=B'"),
        (_config(nologin_files=["nologin"]), "key `nologin_files[0]`: expected an absolute path"),
    ):
        with pytest.raises(ConfigError) as info:
            settings_from_dict(bad)
        assert message in str(info.value)
