"""How the admin sub-commands of `meshmgmt` talk to the REST API and print its answers:
one authenticated call, then a rich table or, with --json, the JSON itself. Every value
a table shows is escaped, since peers and users wrote much of it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .escaping import escape_controls


class ApiError(click.ClickException):
    pass


class Client:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        try:
            async with aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=30)) as http:
                async with http.request(method, self.url + path, json=body, params=params) as resp:
                    text = await resp.text()
                    doc = json.loads(text) if text and resp.content_type == "application/json" else None
                    if resp.status >= 400:
                        msg = doc.get("message", text) if isinstance(doc, dict) else text
                        raise ApiError(f"{method} {path}: {resp.status} {msg}")
                    return doc
        except aiohttp.ClientError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc}") from exc


def client_for(ctx: click.Context) -> Client:
    obj = ctx.find_root().obj
    token_file = obj.get("token_file")
    if not token_file:
        raise click.UsageError("admin commands need --token-file (or MESHMGMT_TOKEN_FILE)")
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise click.UsageError(f"cannot read token file {token_file}: {exc.strerror}") from None
    return Client(obj["url"], token)


def call(ctx: click.Context, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
    return asyncio.run(client_for(ctx).call(method, path, body, params))


def json_mode(ctx: click.Context) -> bool:
    return bool(ctx.find_root().obj.get("json"))


def emit(ctx: click.Context, doc: Any, rows: list[dict[str, Any]] | None = None,
          columns: tuple[str, ...] = (), title: str = "") -> None:
    if json_mode(ctx):
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    rows = rows if rows is not None else ([doc] if isinstance(doc, dict) else [])
    table = Table(title=title or None, show_lines=False)
    for c in columns:
        table.add_column(c)
    for r in rows:  # Text, not str: a value is never read as rich markup ("[link=…]")
        table.add_row(*(Text(cell(r.get(c))) for c in columns))
    Console(width=200).print(table)


def cell(v: Any) -> str:
    """One value as table text; control characters escaped (events stored before
    ingest escaped them, and anything else a client or peer wrote)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ", ".join(cell(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{cell(k)}={cell(x)}" for k, x in sorted(v.items()) if x)
    return escape_controls(str(v))


def resolve_ref(ctx: click.Context, collection: str, ref: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The item whose id is `ref`, else the first whose name (or another of `keys`) is.

    Ids first over the whole list: an item named like another's id must not win."""
    items = call(ctx, "GET", f"/api/{collection}")[collection.replace("-", "_")]
    for item in items:
        if ref == item["id"]:
            return item
    for item in items:
        if any(str(item.get(k, "")).lower() == ref.lower() for k in keys):
            return item
    raise click.ClickException(f"no {collection[:-1]} {ref!r}")


def ok(ctx: click.Context, message: str, doc: Any = None) -> None:
    if json_mode(ctx):
        click.echo(json.dumps(doc if doc is not None else {"ok": True, "message": message}, indent=2, sort_keys=True))
    else:
        click.echo(message)
