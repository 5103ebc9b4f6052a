"""meshsshd/schema.py: msgspec's messages turned into ones that name the key path in
TOML's dotted form and suggest the nearest valid key, at any depth."""

from __future__ import annotations

from typing import Annotated

import msgspec
import pytest

from meshsshd.schema import AbsolutePath, SchemaError, convert


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_sessions: Annotated[int, msgspec.Meta(ge=1)] = 10


class Rule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    sources: list[str] = []


class Doc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limits: Limits | None = None
    access: list[Rule] = []
    user: str | None = None
    path: AbsolutePath | None = None


@pytest.mark.parametrize("doc, message", [
    ({"limits": {"max_sesions": 3}}, "unknown key `limits.max_sesions` (did you mean `limits.max_sessions`?)"),
    ({"limits": {"max_sessions": "ten"}}, "key `limits.max_sessions`: expected `int`, got `str`"),
    ({"limits": {"max_sessions": 0}}, "key `limits.max_sessions`: expected `int` >= 1"),
    ({"access": [{"sorces": []}]}, "unknown key `access[0].sorces` (did you mean `access[0].sources`?)"),
    ({"usr": "x"}, "unknown key `usr` (did you mean `user`?)"),
    ({"zzz": 1}, "unknown key `zzz`"),
    ({"path": "etc/x"}, "key `path`: expected an absolute path (starting with `/`)"),
    ({"path": "/etc/\0x"}, "key `path`: expected an absolute path (starting with `/`)"),
])
def test_messages_name_the_path_and_the_nearest_key(doc: dict, message: str) -> None:
    with pytest.raises(SchemaError) as err:
        convert(doc, Doc, "f.toml")
    assert str(err.value) == f"f.toml: {message}"
