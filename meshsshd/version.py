"""The one version string all three commands print (`meshsshd --version`, `meshmgmt
--version`, `meshssh -V`), with the libraries a bug report needs to name: the SSH
library and the OpenSSL behind `cryptography`, as `ssh -V` names its OpenSSL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import __version__

F = TypeVar("F", bound=Callable[..., Any])


def version_line(prog: str) -> str:
    import asyncssh
    from cryptography.hazmat.backends.openssl.backend import backend

    return f"{prog} {__version__} (asyncssh {asyncssh.__version__}, {backend.openssl_version_text()})"


def version_option(prog: str) -> Callable[[F], F]:
    """click's `--version`, but resolved when asked: `version_line` imports asyncssh, which
    a management CLI call should not pay for on every run."""
    def show(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(version_line(prog))
            ctx.exit()
    return click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=show,
                        help="Show the version and exit.")
