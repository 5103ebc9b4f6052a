"""`meshmgmt peers subsystem ...` and `meshmgmt groups subsystem ...`: SSH subsystems
set from management (served by the peer as if they were in its `[subsystems]`).

    meshmgmt peers subsystem set PEER NAME COMMAND     e.g. powershell 'pwsh -sshs -NoLogo -NoProfile'
    meshmgmt peers subsystem unset PEER NAME
    meshmgmt peers subsystem list [PEER]
    meshmgmt groups subsystem set|unset|list GROUP ...
"""

from __future__ import annotations

import urllib.parse

import click

from .cli_calls import call, emit, ok

COLUMNS = ("name", "command", "peer_name", "group_name", "id")


def _path(kind: str, owner: str, name: str) -> str:
    q = urllib.parse.quote
    return f"/api/{kind}s/{q(owner, safe='')}/subsystems/{q(name, safe='')}"


def _add(parent: click.Group, kind: str) -> None:
    @parent.group("subsystem")
    def subsystem() -> None:
        """SSH subsystems this serves (e.g. powershell → pwsh -sshs -NoLogo -NoProfile)."""

    @subsystem.command("set", context_settings={"ignore_unknown_options": True})
    @click.argument("owner", metavar=kind.upper())
    @click.argument("name")
    @click.argument("command", nargs=-1, required=True)
    @click.pass_context
    def set_(ctx: click.Context, owner: str, name: str, command: tuple[str, ...]) -> None:
        """Serve subsystem NAME by running COMMAND (as the user, through their shell)."""
        doc = call(ctx, "PUT", _path(kind, owner, name), {"command": " ".join(command)})
        ok(ctx, f"subsystem {name} on {kind} {owner}: {doc['command']}", doc)

    @subsystem.command("unset")
    @click.argument("owner", metavar=kind.upper())
    @click.argument("name")
    @click.pass_context
    def unset(ctx: click.Context, owner: str, name: str) -> None:
        """Stop serving subsystem NAME from management (a local [subsystems] entry stays)."""
        call(ctx, "DELETE", _path(kind, owner, name))
        ok(ctx, f"removed subsystem {name} from {kind} {owner}")

    @subsystem.command("list")
    @click.argument("owner", metavar=kind.upper(), required=False)
    @click.pass_context
    def list_(ctx: click.Context, owner: str | None) -> None:
        """Subsystems set from management (all, or those of one peer/group)."""
        doc = call(ctx, "GET", "/api/subsystems")
        rows = doc["subsystems"]
        if owner:
            rows = [r for r in rows if owner in (r.get(kind), r.get(f"{kind}_name"))]
        emit(ctx, {"subsystems": rows}, rows, COLUMNS)


def register(peers: click.Group, groups: click.Group) -> None:
    _add(peers, "peer")
    _add(groups, "group")
