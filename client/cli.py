"""The `meshssh` command: sub-commands beside an `ssh`-compatible default.

`meshssh [options] [user@]host [command ...]` must keep OpenSSH's option syntax
(bundled flags, attached values), which click cannot express, while `login`, `cp`,
`config` ... are ordinary click commands. So `main` looks at the first word that is
not an option (skipping the values of options that take one): a known sub-command goes
to click, anything else is a destination for `meshssh_client.options`/`meshssh_client.connect`.
Imports are lazy: `detect` and `proxy` run once per `ssh` invocation.
"""

from __future__ import annotations

import os
import sys

import click
from click.shell_completion import CompletionItem

from meshsshd.completion import complete_var, completion_command
from meshsshd.version import version_line

from .options import SUBCOMMANDS, first_word, wants_version


SSH_USAGE = """\
usage: meshssh [-46AaNnqsTtVv] [-b bind_address] [-D [bind_address:]port]
               [-i identity_file] [-L [bind_address:]port:host:hostport]
               [-l login_name] [-o option] [-p port]
               [-R [bind_address:]port:host:hostport] [--ssh-jwt-cache-ttl SECONDS]
               [--no-cache] [--delegate-to PEER,group:NAME] [--delegate-max N]
               [--delegate-confirm] [user@]host [command ...]
       meshssh login [--management-url URL] [--no-browser]
       meshssh login --client-id ID --client-secret-file FILE
       meshssh logout | peers | passwd [--password-stdin] | cp [-r] SRC... DST
       meshssh exec [-l user] --hosts a,b,group:NAME [--throttle N] [--json] -- command
       meshssh -d [user@]host [command] | exec --detach host -- command   (detached session)
       meshssh sessions host [--kill ID] | attach host ID | receive host ID [--follow]
       meshssh config install [--refresh] [--path DIR] | config remove
       meshssh detect HOST PORT | proxy HOST PORT   (used by the OpenSSH drop-in)
       meshssh control status|stop   (the master that keeps logins warm; MESHSSH_CONTROL=no: off)
       meshssh completion bash|zsh|fish | -V

Connects to a mesh peer (peer name, FQDN or mesh IP) with a per-peer SSH token,
accepting only the host key management publishes. Options mean what they mean to ssh;
the default port is 22022. Exit status is the remote command's, 255 on errors.
Run `meshssh COMMAND --help` for a sub-command.
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(complete_var("meshssh")):   # the shell asking for completions
        _add_heavy_commands(None)
        cli.main(args=argv, prog_name="meshssh")
        return
    if not argv:
        sys.stderr.write(SSH_USAGE)
        sys.exit(255)
    if argv[0] in ("-h", "--help"):
        sys.stdout.write(SSH_USAGE)
        sys.exit(0)
    if wants_version(argv):
        # as ssh: -V on stderr; --version on stdout as the other two commands' click option
        stream = sys.stdout if argv == ["--version"] else sys.stderr
        stream.write(f"{version_line('meshssh')}\n")
        sys.exit(0)
    idx = first_word(argv)
    if idx is not None and argv[idx] in SUBCOMMANDS and idx == 0:
        _add_heavy_commands(argv[0])
        cli.main(args=argv, prog_name="meshssh")
        return
    from .errors import UsageError
    from .options import parse_ssh_args

    # -d (detached session, client/detach.py) only as a word of its own before the host.
    detach = idx is not None and "-d" in argv[:idx]
    if detach:
        argv.remove("-d")
    try:
        args = parse_ssh_args(argv)
    except UsageError as exc:
        sys.stderr.write(f"meshssh: {exc}\n{SSH_USAGE}")
        sys.exit(255)
    if detach:
        from .detach import main_detached_ssh

        sys.exit(main_detached_ssh(args))
    from .connect import main_connect

    try:
        code = main_connect(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _fail(exc: Exception, code: int = 1) -> None:
    click.echo(f"meshssh: {exc}", err=True)
    sys.exit(code)


class _Commands(click.Group):
    """The sub-commands, and in the first word's completions also the peers this user may
    reach, from the cached peer list only: a TAB must not wait on the network."""

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        from . import state

        items = super().shell_complete(ctx, incomplete)
        doc = state.read_json(state.PEERS_FILE)
        peers = doc.get("peers", []) if isinstance(doc, dict) else []
        user, at, host = incomplete.rpartition("@")
        names = sorted({p.get("name", "") for p in peers if isinstance(p, dict)} - {""})
        return items + [CompletionItem(f"{user}{at}{n}") for n in names if n.startswith(host)]


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """meshssh sub-commands (see `meshssh --help` for connecting)."""


cli.add_command(completion_command("meshssh"))


@cli.command()
@click.option("--management-url", envvar="MESHSSH_MANAGEMENT_URL",
              help="management server URL (default: the one you last logged in to)")
@click.option("--no-browser", is_flag=True, envvar="MESHSSH_NO_BROWSER",
              help="only print the URL and code; do not try to open a browser")
@click.option("--client-id", help="service user: client id (client-credentials grant)")
@click.option("--client-secret-file", type=click.Path(dir_okay=False),
              help="service user: file holding the client secret")
def login(management_url: str | None, no_browser: bool, client_id: str | None,
          client_secret_file: str | None) -> None:
    """Log in to the mesh (OAuth device flow in a browser, or a service user's secret)."""
    from . import auth
    from .errors import ClientError

    try:
        if not management_url:
            from . import userconfig

            management_url = userconfig.load().management_url
        if not management_url:
            try:
                management_url = auth.Login.load().management_url
            except ClientError:
                raise ClientError("no management URL: pass --management-url URL (or set management_url "
                                  "in config.toml)") from None
        if client_id or client_secret_file:
            if not (client_id and client_secret_file):
                raise ClientError("--client-id and --client-secret-file go together")
            try:
                secret = open(client_secret_file).read().strip()
            except OSError as exc:
                raise ClientError(f"cannot read {client_secret_file}: {exc.strerror}") from exc
            result = auth.login_service(management_url, client_id, secret)
        else:
            result = auth.login_device(management_url, no_browser=no_browser)
    except ClientError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _fail("login cancelled", 130)
    click.echo(f"Logged in to {result.management_url} as {result.identity or 'unknown identity'}.",
               err=True)


@cli.command()
def logout() -> None:
    """Forget the stored login and every cached token."""
    from . import auth

    from .control import stop_master

    stopped = stop_master()  # its pooled logins must not outlive the login
    if auth.logout():
        click.echo("Logged out; stored tokens removed.", err=True)
    else:
        click.echo("Not logged in.", err=True)
    if stopped:
        click.echo("Control master stopped.", err=True)


@cli.command()
@click.option("--password-stdin", is_flag=True,
              help="read the current and the new password from stdin, one per line (for scripts)")
def passwd(password_stdin: bool) -> None:
    """Change your password (asked without echo); every login of yours is signed out."""
    from .errors import ClientError
    from .passwd import change_password

    try:
        click.echo(change_password(from_stdin=password_stdin), err=True)
    except ClientError as exc:
        _fail(exc)
    except (KeyboardInterrupt, EOFError):
        _fail("cancelled; nothing was changed", 130)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("action", type=click.Choice(["status", "stop"]))
def control(action: str) -> None:
    """The control master that keeps logins warm: `status`, or `stop` it."""
    from .control import control_command

    sys.exit(control_command([action]))


@cli.command()
@click.argument("host")
@click.argument("port", type=int)
@click.option("--timeout", type=float, default=3.0, show_default=True)
def detect(host: str, port: int, timeout: float) -> None:
    """Exit 0 for a meshsshd that needs a JWT, 1 for one without, 2 otherwise."""
    from .detect import detect as run

    sys.exit(run(host, port, timeout))


@cli.command()
@click.argument("host")
@click.argument("port", type=int)
@click.option("--user", "user", help="login name OpenSSH will use (%r), to dial the peer early")
@click.option("--ssh-jwt-cache-ttl", "ttl", envvar="MESHSSH_SSH_JWT_CACHE_TTL", default=None)
@click.option("--no-cache", is_flag=True)
def proxy(host: str, port: int, user: str | None, ttl: str | None, no_cache: bool) -> None:
    """OpenSSH ProxyCommand: relay OpenSSH to the peer, authenticating with a JWT."""
    from .proxy import main_proxy

    sys.exit(main_proxy(host, port, user, ttl, no_cache))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def peers(as_json: bool) -> None:
    """List the peers you may reach by SSH."""
    import json

    from .auth import Session
    from .errors import ClientError
    from .peers import PeerDirectory

    try:
        session = Session()
        lst = PeerDirectory(session).peers(refresh=True)
    except ClientError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in lst], indent=1))
        return
    if not lst:
        # The list is what policies let this identity reach: empty means no policy yet.
        click.echo(f"No peers: no policy on {session.login.management_url} lets {session.identity} "
                   "reach a peer yet (an admin adds one: meshmgmt policies create ...).", err=True)
        return
    rows = [("NAME", "MESH IP", "FQDN", "SSH", "USERS")]
    rows += [(p.name, p.mesh_ip, p.fqdn, "ssh" if p.ssh_enabled else "no-ssh", ",".join(p.local_users) or "-")
             for p in lst]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[4])


@cli.group()
def config() -> None:
    """Manage the OpenSSH drop-in that routes `ssh`/`scp`/`sftp` to peers via meshssh."""


@config.command("install")
@click.option("--refresh", is_flag=True, help="rewrite from the current peer list (quietly)")
@click.option("--path", "path", type=click.Path(file_okay=False),
              envvar="MESHSSH_SSH_CONFIG_DIR", help="write into this directory instead")
def config_install(refresh: bool, path: str | None) -> None:
    """Write the drop-in and the managed known_hosts file."""
    from .errors import ClientError
    from .sshconfig import install

    try:
        for line in install(path, refresh=refresh):
            click.echo(line, err=True)
    except ClientError as exc:
        _fail(exc)


@config.command("remove")
@click.option("--path", "path", type=click.Path(file_okay=False), envvar="MESHSSH_SSH_CONFIG_DIR")
def config_remove(path: str | None) -> None:
    """Delete the drop-in, the known_hosts file and any Include line meshssh added."""
    from .sshconfig import remove

    for line in remove(path):
        click.echo(line, err=True)


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("-r", "recursive", is_flag=True, help="copy directories recursively")
@click.option("-P", "port", type=int, default=None, help="peer port (default 22022)")
@click.option("-p", "preserve", is_flag=True, help="preserve modification times and modes")
@click.option("-q", "quiet", is_flag=True, help="no progress bar")
@click.option("-b", "bind_address", default=None, help="source address")
@click.option("--ssh-jwt-cache-ttl", "ttl", envvar="MESHSSH_SSH_JWT_CACHE_TTL", default=None)
@click.option("--no-cache", is_flag=True)
@click.argument("paths", nargs=-1, required=True)
def cp(recursive: bool, port: int | None, preserve: bool, quiet: bool, bind_address: str | None,
       ttl: str | None, no_cache: bool, paths: tuple[str, ...]) -> None:
    """Copy files to/from peers over SFTP: SRC... DST, remote paths as [user@]host:path."""
    from .cp import main_cp

    sys.exit(main_cp(list(paths), recursive=recursive, port=port, preserve=preserve,
                     quiet=quiet, bind_address=bind_address, ttl=ttl, no_cache=no_cache))


def _add_heavy_commands(name: str | None) -> None:
    """Register `exec` (client/fanout.py) and `sessions | attach | receive`
    (client/detach.py) only when one of them runs: they import asyncio and rich, and
    `detect`/`proxy` run once per `ssh` invocation, so they must not pay for them.
    `name=None` registers all (for `--help` of the group and for tests)."""
    if name is None or name == "exec":
        from .cli_exec import exec_command

        cli.add_command(exec_command)
    if name is None or name in ("sessions", "attach", "receive"):
        from .detach import COMMANDS

        for command in COMMANDS:
            cli.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
