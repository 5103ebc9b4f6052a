"""The `meshssh exec` sub-command: options into an `ExecRequest`, run by fan-out
(client/fanout.py) or, with `--detach`, started as detached sessions (client/detach.py).
It sits above both so neither imports the other."""

from __future__ import annotations

import sys
from typing import Any

import click

from .fanout import (DEFAULT_MAX_OUTPUT, DEFAULT_THROTTLE, ExecRequest, main_exec, read_hosts_file,
                     split_hosts)


@click.command("exec", context_settings={"allow_interspersed_args": False,
                                         "help_option_names": ["-h", "--help"]})
@click.option("--hosts", "-H", "hosts", multiple=True, metavar="A,B,group:NAME",
              help="peers to run on: names, FQDNs, mesh IPs, or group:NAME (repeatable)")
@click.option("--hosts-file", "hosts_file", type=click.File("r"), default=None,
              help="read targets from a file (one per line, # comments), as pssh -h")
@click.option("-l", "user", default=None, help="login name on the peers")
@click.option("-p", "port", type=int, default=None, help="peer port (default 22022)")
@click.option("--throttle", type=click.IntRange(1, 4096), default=DEFAULT_THROTTLE, show_default=True,
              help="at most this many peers at a time (Invoke-Command -ThrottleLimit)")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="give up on a peer after this many seconds (connect and command)")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per peer (JSON Lines)")
@click.option("--max-output", type=click.IntRange(0), default=DEFAULT_MAX_OUTPUT, show_default=True,
              help="with --json: bytes kept per peer and stream (the rest is dropped, marked truncated)")
@click.option("-q", "quiet", is_flag=True, help="no progress bar, no summary")
@click.option("-v", "verbose", is_flag=True, help="say how the tokens were fetched")
@click.option("-b", "bind_address", default=None, help="source address (your peer's mesh IP)")
@click.option("--detach", is_flag=True,
              help="start the command as a detached session and print its id")
@click.argument("words", nargs=-1, required=True)
def exec_command(hosts: tuple[str, ...], hosts_file: Any, user: str | None, port: int | None, throttle: int,
                 timeout: float | None, connect_timeout: float, as_json: bool, max_output: int,
                 quiet: bool, verbose: bool, bind_address: str | None, detach: bool, words: tuple[str, ...]) -> None:
    """Run COMMAND on many peers at once: meshssh exec --hosts a,b,group:web -- COMMAND.

    Without --hosts the first word is the host list. Each output line is prefixed with
    the peer's name (stderr lines on stderr). Exit 0 only when every peer succeeded;
    1 when a command failed; 255 when a peer could not be reached or refused.
    """
    words_l = list(words)
    host_words = list(hosts)
    if hosts_file is not None:
        host_words += read_hosts_file(hosts_file.read())
        if not host_words:
            raise click.UsageError(f"{hosts_file.name} names no peer")
    if not host_words:
        if len(words_l) < 2:
            raise click.UsageError("name the peers with --hosts (or as the first word) and a command")
        host_words = [words_l.pop(0)]
    if words_l and words_l[0] == "--":
        words_l.pop(0)
    if not words_l:
        raise click.UsageError("no command given")
    req = ExecRequest(hosts=tuple(split_hosts(host_words)), command=" ".join(words_l), user=user,
                      port=port, throttle=throttle, timeout=timeout, connect_timeout=connect_timeout,
                      as_json=as_json, max_output=max_output, quiet=quiet, verbose=verbose,
                      bind_address=bind_address, detach=detach)
    if not req.hosts:
        raise click.UsageError("--hosts names no peer")
    if detach:
        from .detach import exec_detached

        sys.exit(exec_detached(req))
    sys.exit(main_exec(req))
