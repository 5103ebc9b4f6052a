"""Finding a peer or group by what an admin typed: its id, else its name.

Ids are looked up strictly first, and no name may look like an id (`new_id()`: 16 hex
digits), so a peer cannot register a hostname equal to another peer's id and have admin
commands (delete, rename, group membership, subsystems) act on it instead.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from sqlalchemy import select

ID_SHAPE = "[0-9a-f]{16}"  # what `new_id()` makes
_ID_SHAPE = re.compile(ID_SHAPE)

_Row = TypeVar("_Row")


def is_id_shaped(name: str) -> bool:
    return bool(_ID_SHAPE.fullmatch(name))


def reserve_id_shape(label: str) -> str:
    """A registered name never looks like an id: such a hostname gets a `peer-` prefix."""
    return f"peer-{label}" if is_id_shaped(label) else label


async def by_id_or_name(s: Any, model: type[_Row], ref: str) -> _Row | None:
    """The row whose id is `ref`, else the one whose name is `ref`, else None."""
    row = await s.get(model, ref)
    if row is not None:
        return row
    return (await s.execute(select(model).where(model.name == ref))).scalars().first()  # type: ignore[attr-defined]


__all__ = ["ID_SHAPE", "by_id_or_name", "is_id_shaped", "reserve_id_shape"]
