"""`meshsshd` command line: `serve` (standalone, config file) here; `up`, `down`, `status`
(managed mode) are added by the agent as further `@main.command()`s in this module."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click

from . import event_loop
from .completion import completion_command
from .config import settings_from_toml
from .errors import MeshsshdError
from .logs import setup_logging
from .version import version_option


@click.group()
@version_option("meshsshd")
def main() -> None:
    """meshsshd: mesh peer daemon with an embedded SSH server."""


main.add_command(completion_command("meshsshd"))


async def _serve(config: Path) -> None:
    from .server import MeshSSHServer
    from .session import reset_inherited_signals

    reset_inherited_signals()
    server = MeshSSHServer(settings_from_toml(config))
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        async def run() -> None:
            try:
                await server.apply(settings_from_toml(config))
            except MeshsshdError as exc:
                click.echo(f"meshsshd: reload failed, keeping the old settings: {exc}", err=True)
        loop.create_task(run())

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    await server.stop()


@main.command()
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file (see deploy/meshsshd.example.toml)")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config: Path, log_level: str) -> None:
    """Serve SSH from a config file, without management (SIGHUP reloads it)."""
    setup_logging(log_level)
    try:
        event_loop.run(_serve(config))
    except MeshsshdError as exc:
        click.echo(f"meshsshd: {exc}", err=True)
        sys.exit(exc.exit_code)


def _load_command_modules() -> None:
    """Other rooms add commands to `main` in their own modules (`cli_agent.py`: up, down,
    status); importing them here registers those commands."""
    import importlib
    import importlib.util

    for name in ("meshsshd.cli_agent",):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


_load_command_modules()
