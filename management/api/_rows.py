"""What the admin collections share: path ids, row lookups, list answers, deletes, 409s.

Every write that can change a network map goes through `store.change(...)`, which bumps
the serial and wakes the sync streams (on every replica).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..errors import Conflict, NotFound
from ..store import aware
from .keys import EVENTS, STORE


def iso(dt: Any) -> str | None:
    dt = aware(dt)
    return dt.isoformat().replace("+00:00", "Z") if dt is not None else None


def path_id(request: web.Request) -> str:
    value = request.match_info["id"]
    if len(value) > 64 or "\x00" in value:
        raise NotFound("no such object")
    return value


_Row = TypeVar("_Row")


async def get_row(s: Any, model: type[_Row], request: web.Request, what: str) -> _Row:
    """The row the path's {id} names, or 404 "no such <what>" (one wording for every collection)."""
    row = await s.get(model, path_id(request))
    if row is None:
        raise NotFound(f"no such {what}")
    return row


async def all_rows(s: Any, model: type[_Row], order: Any) -> list[_Row]:
    """Every row of `model`, in `order`: what the list endpoints return."""
    return list((await s.execute(select(model).order_by(order))).scalars().all())


async def list_response(request: web.Request, key: str, model: type[_Row], order: Any,
                        to_dict: Callable[[_Row], dict[str, Any]]) -> web.Response:
    """`{key: [...]}` of every row, for the collections whose dict needs nothing but the row."""
    async with request.app[STORE].session() as s:
        return web.json_response({key: [to_dict(row) for row in await all_rows(s, model, order)]})


async def delete_recorded(request: web.Request, model: type[Any], what: str, change: str,
                          *attrs: str) -> web.Response:
    """Delete the path's row in one map-changing write, then record `change` in the audit feed.

    The row is gone once the event is written, so the named `attrs` (e.g. "email") are read
    before the delete: they are what lets a reader of the feed tell which row it was.
    """
    async with request.app[STORE].change(change) as s:
        row = await get_row(s, model, request, what)
        fields = {a: getattr(row, a) for a in attrs}
        await s.delete(row)
    await request.app[EVENTS].record(change, **fields)
    return web.Response(status=204)


async def flush_unique(s: Any, message: str) -> None:
    """Flush and turn a unique-constraint violation into 409 `message`."""
    try:
        await s.flush()
    except IntegrityError as exc:
        raise Conflict(message) from exc


__all__ = ["all_rows", "delete_recorded", "flush_unique", "get_row", "iso", "list_response", "path_id"]
