"""Typed configuration files: a TOML document converted into msgspec Structs, and errors
that say what a person needs to fix it: the file, the key's full path, what was expected,
and for a misspelt key the nearest valid one ("did you mean `max_sessions`?").

msgspec does the checking (unknown keys, types, bounds in `Meta`, strictly: no "10" for
10); this module only turns its one-line message into one for people. The client's config
and the daemon's config share it, so both read the same way."""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec

from .config_values import MAX_NUMBER

T = TypeVar("T")

# Bounds the config files share, so each key states its own in its type. A count of 0
# that would switch a feature off (every session refused), a NaN that compares false
# with everything (`leeway = nan`: no token ever expires) and an infinity fail here, at
# the key, instead of later and silently: NaN fails `ge`, infinity fails `le`.
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_NUMBER)]
Quota = Annotated[int, msgspec.Meta(ge=0, le=MAX_NUMBER)]          # 0 = off / no cap
Seconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_NUMBER)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_NUMBER)]
Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
# No NUL: the OS refuses it in a path, as a ValueError far from the key.
_NO_NUL = r"^[^\x00]*$"
_ABSOLUTE = r"^/[^\x00]*$"
Text = Annotated[str, msgspec.Meta(pattern=_NO_NUL)]
AbsolutePath = Annotated[str, msgspec.Meta(pattern=_ABSOLUTE)]
# msgspec quotes a failed pattern as a regex; people are told what it means.
_PATTERN_WORDS = {_NO_NUL: "a string without NUL characters", _ABSOLUTE: "an absolute path (starting with `/`)"}

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]*)`$")


class SchemaError(ValueError):
    """A document that does not fit its schema; str() is the whole message."""


def load_toml(path: Path, kind: type[T]) -> T:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(f"{path}: not valid TOML: {exc}") from None
    return convert(data, kind, source=str(path))


def convert(data: Any, kind: type[T], source: str) -> T:
    try:
        return msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise SchemaError(f"{source}: {explain(str(exc), kind)}") from None


def explain(message: str, kind: type) -> str:
    """msgspec's message, with the key path in TOML's dotted form and a suggestion for
    an unknown key."""
    m = _AT.match(message)
    what, path = (m["what"], m["path"] or "") if m else (message, "")
    where = _dotted(path)
    unknown = _UNKNOWN.match(what)
    if unknown:
        key = unknown["key"]
        full = f"{where}.{key}" if where else key
        near = difflib.get_close_matches(key, _field_names(kind, path), n=1, cutoff=0.6)
        hint = f" (did you mean `{f'{where}.{near[0]}' if where else near[0]}`?)" if near else ""
        return f"unknown key `{full}`{hint}"
    what = what[0].lower() + what[1:] if what else what
    for pattern, words in _PATTERN_WORDS.items():
        what = what.replace(f"`str` matching regex {pattern!r}", words)
    return f"key `{where}`: {what}" if where else what


def _dotted(path: str) -> str:
    """msgspec's `.limits.max_sessions` / `.access[0].sources` → `limits.max_sessions` /
    `access[0].sources`."""
    return path[1:] if path.startswith(".") else path


def _field_names(kind: type, path: str) -> list[str]:
    """The keys valid at `path` (a table of the schema), for suggestions."""
    info: Any = msgspec.inspect.type_info(kind)
    for step in re.findall(r"\.([^.\[]+)|\[\d+\]", path):
        if step:   # a key of a table
            table = _table(info)
            info = next((f.type for f in table.fields if f.encode_name == step), None) if table else None
        else:      # an item of a list
            info = getattr(_unwrap(info), "item_type", None)
        if info is None:
            return []
    table = _table(info)
    return [f.encode_name for f in table.fields] if table is not None else []


def _unwrap(info: Any) -> Any:
    """The non-null member of an optional (`X | None`)."""
    if isinstance(info, msgspec.inspect.UnionType):
        members = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        return members[0] if len(members) == 1 else info
    return info


def _table(info: Any) -> Any:
    info = _unwrap(info)
    return info if isinstance(info, msgspec.inspect.StructType) else None
