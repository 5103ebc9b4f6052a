"""Admin sub-commands of `meshmgmt`: thin calls to the REST API with readable output.

Each command resolves names to ids where people type names (groups, peers, policies,
users by email), calls one endpoint, and prints a rich table, or the JSON with --json.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import click

from .cli_calls import ApiError, call, cell, client_for, emit, json_mode, ok, resolve_ref
from .escaping import escape_strings


def _add_list(group: click.Group, collection: str, columns: tuple[str, ...]) -> None:
    """Add `<group> list`: GET the whole collection and print one row per item.

    Shared because every collection lists the same way; only the columns differ.
    """

    @group.command("list", help=f"List the {collection.replace('-', ' ')} (a table, or JSON with --json).")
    @click.pass_context
    def list_(ctx: click.Context) -> None:
        doc = call(ctx, "GET", f"/api/{collection}")
        emit(ctx, doc, doc[collection.replace("-", "_")], columns)


def _add_delete(group: click.Group, collection: str, arg: str, keys: tuple[str, ...], message: str,
                name: str = "delete") -> None:
    """Add `<group> <name> <ARG>`: resolve ARG by id or one of `keys`, DELETE it, say `message`.

    `message` is a str.format template over the resolved item (e.g. "deleted peer {name}"), so the
    confirmation names what was removed even when the user typed an id.
    """

    @group.command(name, help=f"{name.capitalize()} {arg.upper()} (by id or {' or '.join(keys)}).")
    @click.argument(arg)
    @click.pass_context
    def delete(ctx: click.Context, **refs: str) -> None:
        item = resolve_ref(ctx, collection, refs[arg], keys)
        call(ctx, "DELETE", f"/api/{collection}/{item['id']}")
        ok(ctx, message.format_map(item))


def _add_setter(group: click.Group, name: str, collection: str, arg: str, keys: tuple[str, ...],
                body: dict[str, Any], message: str) -> None:
    """Add `<group> <name> <ARG>`: resolve ARG, PUT the fixed `body` on it, say `message`.

    For switches such as block/unblock and enable/disable, where the command name alone says
    what to set; `message` is a str.format template over the resolved item.
    """

    @group.command(name, help=f"{name.capitalize()} {arg.upper()} (by id or {' or '.join(keys)}).")
    @click.argument(arg)
    @click.pass_context
    def setter(ctx: click.Context, **refs: str) -> None:
        item = resolve_ref(ctx, collection, refs[arg], keys)
        doc = call(ctx, "PUT", f"/api/{collection}/{item['id']}", body)
        ok(ctx, message.format_map(item), doc)


_PEER_KEYS = ("name", "mesh_ip", "fqdn")


def register(main: click.Group) -> None:
    # --- users ------------------------------------------------------------------------
    @main.group()
    def users() -> None:
        """Users and service users."""

    _add_list(users, "users", ("id", "email", "name", "role", "service", "client_id", "blocked", "groups"))

    @users.command("create")
    @click.argument("email")
    @click.option("--name", default="")
    @click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True)
    @click.option("--service", is_flag=True, help="a service user (client credentials, for CI and machines)")
    @click.option("--password-stdin", is_flag=True, help="read a password from stdin")
    @click.pass_context
    def users_create(ctx: click.Context, email: str, name: str, role: str, service: bool, password_stdin: bool) -> None:
        """Create a user (a person, or with --service a service user with a client secret)."""
        body: dict[str, Any] = {"email": email, "name": name, "role": role, "service": service}
        if password_stdin:
            body["password"] = sys.stdin.readline().rstrip("\r\n")
        doc = call(ctx, "POST", "/api/users", body)
        emit(ctx, doc, columns=("id", "email", "role", "service", "client_id"))
        if doc.get("client_secret") and not json_mode(ctx):
            click.echo(f"client secret (shown once): {doc['client_secret']}")

    @users.command("set-password")
    @click.argument("user")
    @click.option("--password-stdin", is_flag=True, help="read the new password from stdin (for scripts)")
    @click.pass_context
    def users_set_password(ctx: click.Context, user: str, password_stdin: bool) -> None:
        """Set a new password for USER (by id or email), asked without echo; signs out all of their logins."""
        from meshsshd.password_input import PasswordInputError, read_passwords

        item = resolve_ref(ctx, "users", user, ("email",))
        email = cell(item["email"])  # escaped: a federated provider chose it
        try:
            (password,) = read_passwords((f"New password for {email}: ",), from_stdin=password_stdin)
        except PasswordInputError as exc:
            raise click.ClickException(str(exc)) from None
        doc = call(ctx, "PUT", f"/api/users/{item['id']}", {"password": password})
        ok(ctx, f"password of {email} set; their logins were signed out (they log in again with "
                "`meshssh login`)", doc)

    _add_delete(users, "users", "user", ("email",), "deleted user {email}")
    _add_setter(users, "block", "users", "user", ("email",), {"blocked": True}, "blocked {email}")
    _add_setter(users, "unblock", "users", "user", ("email",), {"blocked": False}, "unblocked {email}")

    # --- groups -------------------------------------------------------------------------
    @main.group()
    def groups() -> None:
        """Groups of peers and users (what policies name)."""

    _add_list(groups, "groups", ("id", "name", "peer_names", "user_emails"))

    @groups.command("create")
    @click.argument("name")
    @click.option("--peer", "peers", multiple=True, help="peer id or name (repeat)")
    @click.option("--user", "users_", multiple=True, help="user id or email (repeat)")
    @click.pass_context
    def groups_create(ctx: click.Context, name: str, peers: tuple[str, ...], users_: tuple[str, ...]) -> None:
        """Create a group of peers and users (policies name groups as sources and destinations)."""
        doc = call(ctx, "POST", "/api/groups", {"name": name, "peers": list(peers), "users": list(users_)})
        emit(ctx, doc, columns=("id", "name", "peer_names", "user_emails"))

    @groups.command("update")
    @click.argument("group")
    @click.option("--name", help="new name")
    @click.option("--peer", "peers", multiple=True, help="replace the peers (repeat)")
    @click.option("--user", "users_", multiple=True, help="replace the users (repeat)")
    @click.option("--add-peer", multiple=True)
    @click.option("--add-user", multiple=True)
    @click.pass_context
    def groups_update(ctx: click.Context, group: str, name: str | None, peers: tuple[str, ...],
                      users_: tuple[str, ...], add_peer: tuple[str, ...], add_user: tuple[str, ...]) -> None:
        """Rename a group, replace its members, or add members to it."""
        g = resolve_ref(ctx, "groups", group, ("name",))
        body: dict[str, Any] = {}
        if name:
            body["name"] = name
        if peers or add_peer:
            body["peers"] = list(peers) if peers else g["peers"] + list(add_peer)
        if users_ or add_user:
            body["users"] = list(users_) if users_ else g["users"] + list(add_user)
        doc = call(ctx, "PUT", f"/api/groups/{g['id']}", body)
        emit(ctx, doc, columns=("id", "name", "peer_names", "user_emails"))

    _add_delete(groups, "groups", "group", ("name",), "deleted group {name}")

    # --- setup keys -----------------------------------------------------------------------
    @main.group("setup-keys")
    def setup_keys() -> None:
        """Keys peers register with."""

    _add_list(setup_keys, "setup-keys", ("id", "name", "reusable", "used_count", "usage_limit", "expires_at",
                                         "state", "auto_groups"))

    @setup_keys.command("create")
    @click.option("--name", default="")
    @click.option("--reusable", is_flag=True)
    @click.option("--expires-in", type=int, default=0, help="seconds; 0 = never")
    @click.option("--usage-limit", type=int, default=0, help="0 = unlimited (reusable keys)")
    @click.option("--auto-group", "auto_groups", multiple=True, help="group new peers join (repeat)")
    @click.pass_context
    def keys_create(ctx: click.Context, name: str, reusable: bool, expires_in: int, usage_limit: int,
                    auto_groups: tuple[str, ...]) -> None:
        """Create a setup key (peers register with it and join its groups); printed once."""
        doc = call(ctx, "POST", "/api/setup-keys", {"name": name, "reusable": reusable, "expires_in": expires_in,
                                                   "usage_limit": usage_limit, "auto_groups": list(auto_groups)})
        emit(ctx, doc, columns=("id", "name", "reusable", "usage_limit", "expires_at", "auto_groups"))
        if not json_mode(ctx):
            click.echo(f"setup key (shown once): {doc['key']}")

    _add_delete(setup_keys, "setup-keys", "key_id", ("name",), "revoked setup key {id}", name="revoke")

    # --- policies ----------------------------------------------------------------------------
    @main.group()
    def policies() -> None:
        """Access policies."""

    @policies.command("list")
    @click.pass_context
    def policies_list(ctx: click.Context) -> None:
        """List the policies with their rules."""
        doc = call(ctx, "GET", "/api/policies")
        rows = []
        for p in doc["policies"]:
            for i, r in enumerate(p["rules"]):
                rows.append({"id": p["id"] if i == 0 else "", "name": p["name"] if i == 0 else "",
                             "enabled": p["enabled"], **r})
        emit(ctx, doc, rows, ("id", "name", "enabled", "sources", "destinations", "protocol", "ports",
                               "bidirectional", "local_users", "allow_root", "accept_env"))

    @policies.command("create")
    @click.argument("name")
    @click.option("--source", "sources", multiple=True, help="group name or user:<email> (repeat)")
    @click.option("--destination", "destinations", multiple=True, help="group name (repeat)")
    @click.option("--protocol", type=click.Choice(["tcp", "udp", "icmp", "all", "ssh"]), default="tcp",
                  show_default=True)
    @click.option("--port", "ports", multiple=True, help='"22" or "8000-8080" (repeat)')
    @click.option("--bidirectional", is_flag=True)
    @click.option("--local-user", "local_users", multiple=True, help="login name, localpart or * (repeat)")
    @click.option("--allow-root", is_flag=True)
    @click.option("--accept-env", "accept_env", multiple=True,
                  help="client variable SSH sessions keep, AcceptEnv pattern like LC_* (repeat; '' for none; "
                       "default: the peer's, LANG LC_*)")
    @click.option("--disabled", is_flag=True)
    @click.option("--rules-file", type=click.Path(exists=True, dir_okay=False), help="JSON list of rules instead")
    @click.pass_context
    def policies_create(ctx: click.Context, name: str, sources: tuple[str, ...], destinations: tuple[str, ...],
                        protocol: str, ports: tuple[str, ...], bidirectional: bool, local_users: tuple[str, ...],
                        allow_root: bool, accept_env: tuple[str, ...], disabled: bool, rules_file: str | None) -> None:
        """Create a policy: which sources may reach which destinations, and for SSH as which local users."""
        if rules_file:
            rules = json.loads(Path(rules_file).read_text())
        else:
            if not sources or not destinations:
                raise click.UsageError("give --source and --destination (or --rules-file)")
            rules = [{"sources": list(sources), "destinations": list(destinations), "protocol": protocol,
                      "ports": list(ports), "bidirectional": bidirectional, "local_users": list(local_users),
                      "allow_root": allow_root, **({"accept_env": [p for p in accept_env if p]} if accept_env else {})}]
        doc = call(ctx, "POST", "/api/policies", {"name": name, "enabled": not disabled, "rules": rules})
        emit(ctx, doc, columns=("id", "name", "enabled"))

    _add_setter(policies, "enable", "policies", "policy", ("name",), {"enabled": True}, "policy {name} enabled")
    _add_setter(policies, "disable", "policies", "policy", ("name",), {"enabled": False}, "policy {name} disabled")

    _add_delete(policies, "policies", "policy", ("name",), "deleted policy {name}")

    # --- peers ---------------------------------------------------------------------------------
    @main.group()
    def peers() -> None:
        """Registered peers."""

    # ssh_enabled is the admin toggle, ssh_state what the peer's map makes of it (serving,
    # toggle off, no policy...; the reason in --json's ssh_state_reason).
    _add_list(peers, "peers", ("id", "name", "mesh_ip", "connected", "ssh_enabled", "ssh_state", "flags",
                               "groups", "version", "last_seen"))

    @peers.command("rename")
    @click.argument("peer")
    @click.argument("new_name")
    @click.pass_context
    def peers_rename(ctx: click.Context, peer: str, new_name: str) -> None:
        """Rename a peer (its mesh name and FQDN)."""
        p = resolve_ref(ctx, "peers", peer, _PEER_KEYS)
        doc = call(ctx, "PUT", f"/api/peers/{p['id']}", {"name": new_name})
        ok(ctx, f"renamed {p['name']} to {doc['name']}", doc)

    _add_delete(peers, "peers", "peer", _PEER_KEYS, "deleted peer {name}")

    @peers.command("ssh")
    @click.argument("peer")
    @click.argument("state", type=click.Choice(["on", "off"]))
    @click.pass_context
    def peers_ssh(ctx: click.Context, peer: str, state: str) -> None:
        """Turn the admin SSH toggle of a peer on or off."""
        p = resolve_ref(ctx, "peers", peer, _PEER_KEYS)
        doc = call(ctx, "PUT", f"/api/peers/{p['id']}", {"ssh_enabled": state == "on"})
        effective = doc.get("ssh_state_reason") or doc.get("ssh_state", "")
        ok(ctx, f"SSH {state} for {p['name']}" + (f"; effective: {effective}" if effective else ""), doc)

    @peers.command("approve-rekey")
    @click.argument("peer")
    @click.option("--expires-in", type=click.IntRange(60, 7 * 86400), default=3600, show_default=True,
                  help="seconds the approval stays usable")
    @click.pass_context
    def peers_approve_rekey(ctx: click.Context, peer: str, expires_in: int) -> None:
        """Let a peer that lost its state (but kept its WireGuard key) register again once,
        keeping its id, name, address and groups."""
        p = resolve_ref(ctx, "peers", peer, _PEER_KEYS)
        doc = call(ctx, "POST", f"/api/peers/{p['id']}/approve-rekey", {"expires_in": expires_in})
        ok(ctx, f"{p['name']} may register again until {doc['rekey_approved_until']} "
                 "(meshsshd up --setup-key KEY on that machine)", doc)

    from .cli_subsystems import register as register_subsystems

    register_subsystems(peers, groups)

    # --- issuer signing keys -----------------------------------------------------------------------
    @main.group()
    def keys() -> None:
        """The issuer's signing keys (private parts never leave the server)."""

    key_columns = ("kid", "alg", "signing", "published", "created", "retired", "withdrawn_at")
    _add_list(keys, "signing-keys", key_columns)

    @keys.command("rotate")
    @click.option("--drop-previous", is_flag=True,
                  help="withdraw the old keys at once (a key leaked): every token they signed stops working")
    @click.pass_context
    def keys_rotate(ctx: click.Context, drop_previous: bool) -> None:
        """Make a new signing key; peers get it with their next network map."""
        doc = call(ctx, "POST", "/api/signing-keys/rotate", {"drop_previous": drop_previous})
        emit(ctx, doc, doc["signing_keys"], key_columns)

    # --- events ----------------------------------------------------------------------------------
    @main.group()
    def events() -> None:
        """The audit log."""

    @events.command("list")
    @click.option("--since", type=int, default=0)
    @click.option("--limit", type=int, default=100)
    @click.option("--follow", "-f", is_flag=True, help="keep printing new events (Ctrl-C to stop)")
    @click.pass_context
    def events_list(ctx: click.Context, since: int, limit: int, follow: bool) -> None:
        """The audit log: peers' session and login events (--follow streams new ones)."""
        cols = ("id", "received_at", "type", "peer_id", "identity", "local_user", "source_ip", "command", "reason")
        if not follow:
            doc = escape_strings(call(ctx, "GET", "/api/events", params={"since": since, "limit": limit}))
            emit(ctx, doc, doc["events"], cols)
            return
        client = client_for(ctx)
        as_json = json_mode(ctx)

        async def follow_() -> None:
            async with aiohttp.ClientSession(headers=client.headers) as http:
                params = {"since": str(since)} if since else {}
                async with http.ws_connect(client.url + "/api/events/stream", params=params) as ws:
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        e = escape_strings(json.loads(msg.data).get("event", {}))
                        if as_json:
                            click.echo(json.dumps(e, sort_keys=True))
                        else:
                            click.echo("  ".join(f"{c}={cell(e.get(c))}" for c in cols if e.get(c) is not None))
                        sys.stdout.flush()

        try:
            asyncio.run(follow_())
        except KeyboardInterrupt:
            pass
        except aiohttp.ClientError as exc:
            raise ApiError(f"event stream failed: {exc}") from exc
