"""`meshmgmt`: set up and run the management server, and administer it over its API.

    meshmgmt init  --data-dir DIR --admin-email EMAIL [--admin-password-stdin] [--database URL]
    meshmgmt serve --data-dir DIR --listen HOST:PORT [--database URL] [--public-url URL] [--network CIDR]
                   [--trusted-proxy CIDR]...
    meshmgmt admin-token rotate --data-dir DIR [--database URL] [--lifetime 90d]
    meshmgmt [--url URL] [--token-file F] [--json] <users|groups|setup-keys|policies|peers|events|keys> <verb> ...

Admin commands read the URL and token from the flags, or from MESHMGMT_URL /
MESHMGMT_TOKEN_FILE; they print tables for people and JSON with --json.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from meshsshd.completion import completion_command
from meshsshd.version import version_option

from .errors import ManagementError

EXIT_USAGE = 2


def _listen(spec: str) -> tuple[str, int]:
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port_s = rest.lstrip(":")
    else:
        host, _, port_s = spec.rpartition(":")
    try:
        port = int(port_s)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{spec!r} is not HOST:PORT", param_hint="--listen") from None
    return host or "127.0.0.1", port


class Duration(click.ParamType):
    """Seconds, or a number with s, m, h or d: `30d`, `12h`, `900`."""

    name = "duration"
    _UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        unit = self._UNITS.get(text[-1:], 0)
        number = text[:-1] if unit else text
        if not number.isdigit() or int(number) == 0:
            self.fail(f"{value!r} is not a duration such as 30d, 12h, 15m or 900 (seconds)", param, ctx)
        return int(number) * (unit or 1)


# --- the command group ---------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="MESHMGMT_URL", default="http://127.0.0.1:8080", show_default=True,
              help="management server URL (admin commands)")
@click.option("--token-file", envvar="MESHMGMT_TOKEN_FILE", type=click.Path(dir_okay=False),
              help="file holding the admin token or an admin's access token (admin commands)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@version_option("meshmgmt")
@click.pass_context
def main(ctx: click.Context, url: str, token_file: str | None, as_json: bool) -> None:
    """meshmgmt: the meshsshd management server and its admin commands."""
    ctx.obj = {"url": url.rstrip("/"), "token_file": token_file, "json": as_json}


main.add_command(completion_command("meshmgmt"))


@main.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--admin-email", required=True)
@click.option("--admin-password-stdin", is_flag=True, help="read the admin's password from stdin")
@click.option("--database", envvar="MESHMGMT_DATABASE", help="postgresql://... (default: SQLite in DATA_DIR)")
@click.option("--admin-token-lifetime", type=Duration(), default="90d", show_default=True,
              help="how long DIR/admin.token works (renew with `meshmgmt admin-token rotate`)")
def init(data_dir: Path, admin_email: str, admin_password_stdin: bool, database: str | None,
         admin_token_lifetime: int) -> None:
    """Create the store, DIR/issuer.secret, the issuer's signing key, the first admin and
    DIR/admin.token."""
    os.umask(0o077)  # the database and the token file are secrets
    from .bootstrap import AlreadyInitialised, already_initialised, initialise

    refusal = already_initialised(data_dir)
    if refusal is not None:   # before the password: its checks cannot matter then
        raise click.ClickException(refusal)
    password = None
    if admin_password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        from .store.passwords import password_problem

        problem = password_problem(password)
        if problem:
            raise click.ClickException(f"the admin password {problem}")
    try:
        result = asyncio.run(initialise(data_dir, admin_email, password, database, admin_token_lifetime))
    except AlreadyInitialised as exc:
        raise click.ClickException(str(exc)) from None
    except ManagementError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"initialised {data_dir}")
    click.echo(f"  admin user:   {result['email']} ({'with' if password else 'without'} a password)")
    click.echo(f"  admin token:  {result['token_file']} (mode 0600, expires {result['expires_at']:%Y-%m-%d %H:%M} UTC)")
    click.echo(f"  key secret:   {result['secret_file']} (mode 0600; every replica needs a copy, keep it out of "
               "database backups)")
    click.echo(f"  signing key:  {result['kid']}")
    click.echo(f"  peer box key: {result['box_key_file']} (mode 0600; copy it to every replica's data dir)")


@main.group("admin-token")
def admin_token() -> None:
    """The admin token in DIR/admin.token (run on the management server)."""


@admin_token.command("rotate")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--database", envvar="MESHMGMT_DATABASE", help="postgresql://... (default: SQLite in DATA_DIR)")
@click.option("--lifetime", type=Duration(), default="90d", show_default=True, help="how long the new token works")
def admin_token_rotate(data_dir: Path, database: str | None, lifetime: int) -> None:
    """Write a new admin token to DIR/admin.token; the old one stops working at once."""
    os.umask(0o077)
    from .bootstrap import rotate_admin_token

    try:
        result = asyncio.run(rotate_admin_token(data_dir, database, lifetime))
    except ManagementError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"new admin token in {result['token_file']} (mode 0600), expires "
               f"{result['expires_at']:%Y-%m-%d %H:%M} UTC; {result['revoked']} old token(s) revoked")


@main.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--listen", "listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT")
@click.option("--database", envvar="MESHMGMT_DATABASE", help="postgresql://... (default: SQLite in DATA_DIR)")
@click.option("--public-url", help="URL peers and browsers use (issuer URL); default http://LISTEN")
@click.option("--network", default="100.64.0.0/10", show_default=True, help="mesh address pool")
@click.option("--dns-domain", default="mesh.internal", show_default=True, help="peer FQDN suffix")
@click.option("--log-level", default="info", show_default=True)
@click.option("--register-rate", type=float, default=2.0, show_default=True,
              help="peer registrations per second per client address (after the burst)")
@click.option("--register-burst", type=int, default=20, show_default=True)
@click.option("--refresh-token-lifetime", type=Duration(), default="30d", show_default=True,
              help="a login's refresh tokens end this long after it, however often they are used")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="CIDR",
              help="a reverse proxy (address or network, repeatable) whose X-Forwarded-For names the client")
@click.option("--ssh-permit-open", "ssh_permit_open", multiple=True, metavar="HOST:PORT",
              help="where peers let `ssh -L`/`-D` connect (OpenSSH PermitOpen syntax; repeat; default any)")
@click.option("--ssh-permit-listen", "ssh_permit_listen", multiple=True, metavar="[HOST:]PORT",
              help="where peers let `ssh -R` listen (OpenSSH PermitListen syntax; repeat; default any)")
@click.option("--metrics-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="GET /metrics then needs 'Authorization: Bearer <this file's token>'")
@click.option("--audit-rate", type=float, default=50.0, show_default=True,
              help="audit events per second per peer (each started KiB counts as one), after the burst")
@click.option("--audit-burst", type=int, default=5000, show_default=True)
@click.option("--audit-retention", type=Duration(), default=None,
              help="delete audit events older than this (e.g. 90d); default: keep them")
@click.option("--max-connections-per-client", type=int, default=64, show_default=True,
              help="open connections one client address may hold (trusted proxies are exempt)")
@click.option("--header-timeout", type=Duration(), default="15s", show_default=True,
              help="time a connection has to send a complete request head (and may idle between requests)")
def serve(data_dir: Path, listen: str, database: str | None, public_url: str | None, network: str,
          dns_domain: str, log_level: str, register_rate: float, register_burst: int,
          refresh_token_lifetime: int, trusted_proxies: tuple[str, ...], ssh_permit_open: tuple[str, ...],
          ssh_permit_listen: tuple[str, ...],
          metrics_token_file: Path | None, audit_rate: float, audit_burst: int,
          audit_retention: int | None, max_connections_per_client: int, header_timeout: int) -> None:
    """Run the management server (REST API, issuer, sync streams)."""
    os.umask(0o077)
    from .bootstrap import run_server

    host, port = _listen(listen)
    url_host = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        url_host = "127.0.0.1"
    try:
        run_server(data_dir, host, port, database=database,
                   public_url=public_url or f"http://{url_host}:{port}", network=network,
                   dns_domain=dns_domain, log_level=log_level, register_rate=register_rate,
                   register_burst=register_burst, trusted_proxies=trusted_proxies,
                   refresh_token_lifetime=refresh_token_lifetime, ssh_permit_open=ssh_permit_open,
                   ssh_permit_listen=ssh_permit_listen,
                   metrics_token_file=metrics_token_file, audit_rate=audit_rate, audit_burst=audit_burst,
                   audit_retention=audit_retention, max_connections_per_client=max_connections_per_client,
                   header_timeout=float(header_timeout))
    except ManagementError as exc:
        click.echo(f"meshmgmt: {exc.message}", err=True)
        sys.exit(EXIT_USAGE)


from . import cli_admin  # noqa: E402  (registers the admin sub-commands on `main`)

cli_admin.register(main)

__all__ = ["main"]
