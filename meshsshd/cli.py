"""`meshsshd` command line: `serve` (standalone, config file) here; `up`, `down`, `status`
(managed mode) are added by the agent as further `@main.command()`s in this module."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from . import event_loop
from .completion import completion_command
from .config import format_listen, settings_from_toml
from .errors import ConfigError, MeshsshdError
from .logs import event, setup_logging
from .version import version_option

log = logging.getLogger("meshsshd.cli")


@click.group()
@version_option("meshsshd")
def main() -> None:
    """meshsshd: mesh peer daemon with an embedded SSH server."""


main.add_command(completion_command("meshsshd"))


@dataclass
class _Standalone:
    """What the metrics endpoint reads in `serve` mode (in `up` mode it is the agent)."""

    server: Any = None


_early_hups: list[bool] = []


async def _serve(config: Path) -> None:
    from .audit import FanoutAuditSink, LoggingAuditSink
    from .server import MeshSSHServer
    from .session import reset_inherited_signals

    reset_inherited_signals()
    # Signals first: a SIGHUP that arrives while the server starts (a config tool
    # reloading at once) is a reload to do once it runs, not the default "terminate".
    loop = asyncio.get_running_loop()
    stop, reload_wanted = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_wanted.set)
    if _early_hups:   # one came while the command was still importing (see serve())
        reload_wanted.set()
    settings = await asyncio.to_thread(settings_from_toml, config)
    source = _Standalone()
    metrics = None
    if settings.metrics_listen:   # only then: the metrics server brings aiohttp (~10 MiB)
        from .metrics import MetricsServer

        metrics = MetricsServer(format_listen(settings.metrics_listen), agent=source)
    audit = FanoutAuditSink(LoggingAuditSink(), metrics) if metrics else LoggingAuditSink()
    server = source.server = MeshSSHServer(settings, audit=audit)
    await server.start()
    if metrics is not None:
        try:
            await metrics.start()
        except OSError as exc:
            await server.stop()
            raise ConfigError(f"cannot serve metrics on {format_listen(settings.metrics_listen)}: "
                              f"{exc.strerror}") from exc

    async def reloads() -> None:
        while True:
            await reload_wanted.wait()
            reload_wanted.clear()
            try:
                await server.apply(await asyncio.to_thread(settings_from_toml, config))
                event(log, "config.reloaded", config=str(config))
            except MeshsshdError as exc:
                event(log, "config.reload_failed", logging.ERROR, config=str(config), error=str(exc),
                      effect="the old settings stay in force")

    reloader = loop.create_task(reloads())
    await stop.wait()
    reloader.cancel()
    if metrics is not None:
        await metrics.stop()
    await server.stop()


@main.command()
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file (see deploy/meshsshd.example.toml)")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config: Path, log_level: str) -> None:
    """Serve SSH from a config file, without management (SIGHUP reloads it)."""
    # Before the slow imports (asyncssh, the server): a HUP from then on is noted and
    # becomes a reload once the server runs, instead of the default action, "terminate".
    signal.signal(signal.SIGHUP, lambda *_: _early_hups.append(True))
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
