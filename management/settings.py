"""MgmtSettings: everything `meshmgmt serve` is configured with, validated when built."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

from .clientaddr import parse_trusted_proxies
from meshsshd.permit_open import PermitOpenError, parse_permit_listen, validate_entries

from .errors import BadRequest

DEFAULT_NETWORK = "100.64.0.0/10"
DEFAULT_DNS_DOMAIN = "mesh.internal"
MIN_AUDIT_BURST = 1024  # a full upload (1000 events, or a 1 MiB body) must fit in one burst


@dataclass(frozen=True)
class MgmtSettings:
    data_dir: Path
    database: str | None = None  # None: SQLite file in data_dir
    public_url: str = "http://127.0.0.1:8080"
    network: str = DEFAULT_NETWORK
    dns_domain: str = DEFAULT_DNS_DOMAIN
    register_rate: float = 2.0  # registrations per second per client address ...
    register_burst: int = 20  # ... after a burst of this many
    refresh_token_lifetime: int = 30 * 86400  # seconds from a login to the end of its refresh tokens
    idp_options: dict | None = None  # passed to setup_idp as keyword arguments
    trusted_proxies: tuple[str, ...] = ()  # reverse proxies whose X-Forwarded-For is believed
    ssh_permit_open: tuple[str, ...] = ()  # every peer's SSH permit_open (-L/-D destinations); () = any
    ssh_permit_listen: tuple[str, ...] = ()  # every peer's SSH permit_listen (-R binds); () = any
    metrics_token_file: Path | None = None  # GET /metrics needs this file's token as a bearer token
    audit_rate: float = 50.0  # audit events per second per peer (each started KiB of body counts as one) ...
    audit_burst: int = 5000  # ... after a burst of this many
    audit_retention: int | None = None  # seconds audit events are kept; None: forever
    max_connections_per_client: int = 64  # open connections per client address (trusted proxies exempt)
    header_timeout: float = 15.0  # seconds a connection may take to send a request head (and idle between)

    def __post_init__(self) -> None:
        try:
            net = ipaddress.ip_network(self.network, strict=True)
        except ValueError as exc:
            raise BadRequest(f"--network {self.network!r} is not a CIDR network address: {exc}",
                             field="network") from exc
        if net.num_addresses < 8:
            raise BadRequest("--network must have room for at least a few peers (/29 or larger)",
                             field="network")
        if not 300 <= self.refresh_token_lifetime <= 366 * 86400:
            raise BadRequest("--refresh-token-lifetime must be between 5 minutes and a year",
                             field="refresh_token_lifetime")
        if not (self.audit_rate > 0 and math.isfinite(self.audit_rate)) or self.audit_burst < MIN_AUDIT_BURST:
            raise BadRequest(f"--audit-rate must be a positive number and --audit-burst at least {MIN_AUDIT_BURST} "
                             "(one full upload)", field="audit_rate")
        if self.max_connections_per_client < 1 or not 1 <= self.header_timeout <= 3600:
            raise BadRequest("--max-connections-per-client must be at least 1 and --header-timeout between 1 s "
                             "and an hour", field="max_connections_per_client")
        object.__setattr__(self, "public_url", self.public_url.rstrip("/"))
        proxies = parse_trusted_proxies(self.trusted_proxies)
        object.__setattr__(self, "trusted_proxies", tuple(str(n) for n in proxies))
        try:
            validate_entries(self.ssh_permit_open, "--ssh-permit-open")
        except PermitOpenError as exc:
            raise BadRequest(str(exc), field="ssh_permit_open") from exc
        try:
            validate_entries(self.ssh_permit_listen, "--ssh-permit-listen", parse_permit_listen)
        except PermitOpenError as exc:
            raise BadRequest(str(exc), field="ssh_permit_listen") from exc
