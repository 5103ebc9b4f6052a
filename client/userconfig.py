"""The client's config file, `config.toml` in the client's directory (by default
`~/.config/meshssh/config.toml`): defaults a user would otherwise repeat on every command.

    management_url = "https://mgmt.example.com"   # `meshssh login` without --management-url
    user = "alice"                # login name on peers when none is given (ssh's `User`)
    source_address = "100.64.0.7" # like -b / MESHSSH_SOURCE_ADDRESS
    control_persist = 600         # seconds the control master waits (MESHSSH_CONTROL_PERSIST)

Command-line options win over environment variables, which win over this file. The file
is read where a value is needed (a control master reads it when it starts). A key that
does not exist, a wrong type or an address that is not one is refused with the file and
key named, never ignored."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import msgspec

from meshsshd.schema import SchemaError, load_toml

from .errors import UsageError
from .state import config_dir

CONFIG_FILE = "config.toml"
WEEK = 7 * 86400


class ClientConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    management_url: str | None = None
    user: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    source_address: str | None = None
    control_persist: Annotated[float, msgspec.Meta(ge=0, le=WEEK)] | None = None

    def __post_init__(self) -> None:
        if self.source_address is not None:
            try:
                ipaddress.ip_address(self.source_address)
            except ValueError:
                raise ValueError(f"source_address {self.source_address!r} is not an IP address") from None
        if self.management_url is not None and not self.management_url.startswith(("http://", "https://")):
            raise ValueError(f"management_url {self.management_url!r} is not an http(s) URL")


def load() -> ClientConfig:
    path = config_dir() / CONFIG_FILE
    if not path.exists():
        return ClientConfig()
    try:
        return load_toml(path, ClientConfig)
    except SchemaError as exc:
        raise UsageError(str(exc)) from None
