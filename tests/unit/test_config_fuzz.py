"""Property tests for the config loader and the network-map parser (issue 12).

Whatever a config file or a map holds, the loaders answer with valid settings or with
their own error (ConfigError, NetmapError) naming the key — never another exception (which
would crash a SIGHUP reload or the map loop) and never a settings value that is NaN or
infinite (which makes comparisons such as `now > exp + leeway` never refuse).

Derandomized with a bounded number of examples, so CI runs the same cases in seconds.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshsshd.config import ConfigFile, Limits, ServerSettings, settings_from_dict, settings_from_toml
from meshsshd.errors import ConfigError
from meshsshd.netmap import NetmapError, NetworkMap

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Values a TOML table or a JSON document can carry, with the numbers that broke things
# (NaN, inf, 1e309 → inf, negatives, huge integers, bools where numbers go) well represented.
NUMBERS = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e309, -1, -0.5, 0, 1, 1.5, 2**63, 10**400]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.booleans(), NUMBERS, st.text(max_size=20),
                    st.sampled_from(["127.0.0.1:22", "[::1]:0", "0.0.0.0", "http://[x", "a\0b", "/tmp", "*"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)

# [jwt] and [limits] hold numbers and strings: try those more often than nested values.
TABLE_VALUES = st.one_of(NUMBERS, st.text(max_size=10), VALUES)
BASE_CONFIG: dict[str, Any] = {"listen": ["127.0.0.1:0"], "state_dir": "/nonexistent/state", "disable_auth": True}
KNOWN_KEYS = {f.name for f in msgspec.structs.fields(ConfigFile)}
JWT_KEYS = {f.name for f in msgspec.structs.fields(type(ConfigFile().jwt))}
LIMIT_KEYS = sorted(f.name for f in msgspec.structs.fields(Limits))


def non_finite(value: Any) -> list[str]:
    """Paths of the NaN/inf floats anywhere in a settings value."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else ["."]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f"{f.name}{p}" for f in dataclasses.fields(value) for p in non_finite(getattr(value, f.name))]
    if isinstance(value, msgspec.Struct):
        return [f"{k}{p}" for k, v in msgspec.structs.asdict(value).items() for p in non_finite(v)]
    if isinstance(value, dict):
        return [f"[{k!r}]{p}" for k, v in value.items() for p in non_finite(v)]
    if isinstance(value, (list, tuple)):
        return [f"[{i}]{p}" for i, v in enumerate(value) for p in non_finite(v)]
    return []


def check_settings(load: Any, *args: Any) -> None:
    try:
        result = load(*args)
    except ConfigError as exc:
        assert str(exc)
        event("refused")
        return
    event("loaded")   # --hypothesis-show-statistics: both outcomes must be common
    assert isinstance(result, ServerSettings)
    assert not non_finite(result), non_finite(result)
    for f in msgspec.structs.fields(Limits):
        value = getattr(result.limits, f.name)
        assert all(v >= 0 for v in (value if isinstance(value, tuple) else (value,))), f.name


@FUZZ
@given(top=st.dictionaries(st.sampled_from(sorted(KNOWN_KEYS - {"jwt", "limits"}) + ["bogus"]), VALUES, max_size=2),
       jwt=st.dictionaries(st.sampled_from(sorted(JWT_KEYS)), TABLE_VALUES, max_size=4),
       limits=st.dictionaries(st.sampled_from([*LIMIT_KEYS, "bogus"]), TABLE_VALUES, max_size=3),
       tables=st.sampled_from(["both", "jwt", "limits", "raw"]), raw_tables=VALUES)
def test_settings_from_dict_loads_or_raises_config_error(top: dict[str, Any], jwt: dict[str, Any],
                                                         limits: dict[str, Any], tables: str,
                                                         raw_tables: Any) -> None:
    data = {**BASE_CONFIG, **top}
    if tables == "raw":
        data["jwt"] = data["limits"] = raw_tables
    if tables in ("both", "jwt"):
        data["jwt"] = jwt
    if tables in ("both", "limits"):
        data["limits"] = limits
    check_settings(settings_from_dict, data)


# TOML spellings of the values above, so the parser's own reading (nan, inf, +nan,
# integers beyond 64 bits, dates) is part of what is tried.
TOML_LITERALS = st.one_of(
    st.sampled_from(["nan", "+nan", "-nan", "inf", "+inf", "-inf", "1e309", "-1", "-0.0", "0", "1.5", "30",
                     "99999999999999999999", "true", "false", '"x"', '"127.0.0.1:22"', "[1, 2, 3]", "[]",
                     "[10, 30, 100]", "[-1, 30, 100]", "[nan, 1, 2]", "{}", "1979-05-27", "'a\\0b'", "=", "["]),
    st.integers().map(str), st.floats().map(repr),
)
TOML_KEYS = st.one_of(st.sampled_from(sorted(KNOWN_KEYS)), st.sampled_from(sorted(JWT_KEYS)),
                      st.sampled_from(LIMIT_KEYS))


@FUZZ
@given(top=st.lists(st.tuples(st.sampled_from(sorted(KNOWN_KEYS - {"jwt", "limits", "access"})), TOML_LITERALS),
                    max_size=3),
       sections=st.lists(st.tuples(st.sampled_from(["jwt", "limits"]),
                                   st.lists(st.tuples(TOML_KEYS, TOML_LITERALS), max_size=4)), max_size=2))
def test_settings_from_toml_loads_or_raises_config_error(top: list[tuple[str, str]],
                                                         sections: list[tuple[str, list[tuple[str, str]]]]) -> None:
    lines = ['listen = ["127.0.0.1:0"]', 'state_dir = "/nonexistent/state"', "disable_auth = true"]
    lines += [f"{k} = {v}" for k, v in top]
    for name, pairs in sections:
        lines.append(f"[{name}]")
        lines += [f"{k} = {v}" for k, v in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "meshsshd.toml"
        path.write_text("\n".join(lines) + "\n")
        check_settings(settings_from_toml, path)


BASE_MAP: dict[str, Any] = {
    "version": 1, "serial": 7, "network": "100.64.0.0/10",
    "peer": {"id": "p-1", "name": "db-1", "fqdn": "db-1.mesh", "mesh_ip": "100.64.0.2"},
    "peers": [{"id": "p-2", "name": "web", "mesh_ip": "100.64.0.3", "endpoints": ["192.0.2.1:51820"]}],
    "firewall_rules": [{"sources": ["100.64.0.3/32"], "protocol": "tcp", "ports": ["22"]}],
    "ssh": {"enabled": True, "issuer": "https://mgmt", "audience": ["p-1"], "jwks": {"keys": []},
            "access": [{"sources": ["100.64.0.0/10"], "identities": ["*"], "local_users": ["*"]}],
            "subsystems": {}},
}
# Where a fuzzed value goes: a top-level field, a field of the peer, of a listed peer,
# of a firewall rule, of the SSH section or of an access rule.
MAP_SLOTS = st.one_of(
    st.tuples(st.just(()), st.sampled_from([*BASE_MAP, "extra"])),
    st.tuples(st.just(("peer",)), st.sampled_from(["id", "name", "fqdn", "mesh_ip", "wg_public_key", "endpoints",
                                                   "ssh_host_keys", "ssh_enabled", "local_users", "groups"])),
    st.tuples(st.just(("peers", 0)), st.sampled_from(["id", "mesh_ip", "endpoints", "ssh_enabled"])),
    st.tuples(st.just(("firewall_rules", 0)), st.sampled_from(["sources", "protocol", "ports", "action"])),
    st.tuples(st.just(("ssh",)), st.sampled_from(["enabled", "issuer", "audience", "jwks", "user_claim", "access",
                                                  "subsystems", "agent_forwarding", "permit_open",
                                                  "permit_listen"])),
    st.tuples(st.just(("ssh", "access", 0)), st.sampled_from(["sources", "identities", "local_users",
                                                              "accept_env"])),
)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


@FUZZ
@given(changes=st.lists(st.tuples(MAP_SLOTS, VALUES), min_size=1, max_size=3))
def test_network_map_parses_or_raises_netmap_error(changes: list[tuple[tuple[tuple[Any, ...], str], Any]]) -> None:
    doc = _copy(BASE_MAP)
    for (path, key), value in changes:
        target: Any = doc
        for step in path:   # an earlier change may have replaced a container: skip then
            if isinstance(target, dict):
                target = target.get(step)
            elif isinstance(target, list) and isinstance(step, int) and step < len(target):
                target = target[step]
            else:
                target = None
        if isinstance(target, dict):
            target[key] = value
    try:
        netmap = NetworkMap.from_dict(doc)
    except NetmapError as exc:
        assert str(exc)
        event("refused")
        return
    event("parsed")
    assert isinstance(netmap, NetworkMap)
    assert not non_finite(netmap), non_finite(netmap)
    assert isinstance(netmap.serial, int) and not isinstance(netmap.serial, bool) and netmap.serial >= 0
    assert NetworkMap.from_dict(netmap.to_dict()) == netmap   # what parsed, round-trips


@FUZZ
@given(doc=VALUES)
def test_network_map_of_any_shape_parses_or_raises_netmap_error(doc: Any) -> None:
    try:
        NetworkMap.from_dict(doc)
    except NetmapError:
        pass


# The cases the fuzzing above found, spelled out: each error names the key.
@pytest.mark.parametrize("table, key, value, words", [
    pytest.param("jwt", "leeway", float("nan"), "key `jwt.leeway`: expected `float` >= 0.0", id="leeway-nan"),
    pytest.param("jwt", "max_token_age", float("inf"), "key `jwt.max_token_age`: expected `float` <=", id="age-inf"),
    pytest.param("jwt", "leeway", -30, "key `jwt.leeway`: expected `float` >= 0.0", id="leeway-negative"),
    pytest.param("jwt", "leeway", "30", "key `jwt.leeway`: expected `float`, got `str`", id="leeway-string"),
    pytest.param("limits", "login_grace", float("nan"), "key `limits.login_grace`: expected `float` >= 0",
                 id="grace-nan"),
    pytest.param("limits", "max_auth_tries", 2.5, "key `limits.max_auth_tries`: expected `int`, got `float`",
                 id="tries-fraction"),
    pytest.param("limits", "max_sessions", True, "key `limits.max_sessions`: expected `int`, got `bool`",
                 id="sessions-bool"),
    pytest.param("limits", "max_startups", [10, -1, 100], "key `limits.max_startups[1]`: expected `int` >= 0",
                 id="startups-negative"),
    pytest.param("limits", "dial_timeout", 10**400, "key `limits.dial_timeout`: number out of range",
                 id="timeout-huge"),
])
def test_bad_numbers_in_config_are_refused_by_name(table: str, key: str, value: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        settings_from_dict({**BASE_CONFIG, table: {key: value}})


@pytest.mark.parametrize("serial, words", [
    pytest.param(float("nan"), "must be a finite number", id="nan"),
    pytest.param(float("inf"), "must be a finite number", id="inf"),
    pytest.param(-1, "must not be negative", id="negative"),
    pytest.param(True, "must be a whole number", id="bool"),
    pytest.param(7.5, "must be a whole number", id="fraction"),
])
def test_bad_numbers_in_the_network_map_are_refused(serial: Any, words: str) -> None:
    with pytest.raises(NetmapError, match=f"field 'serial' {re.escape(words)}"):
        NetworkMap.from_dict({**_copy(BASE_MAP), "serial": serial})
