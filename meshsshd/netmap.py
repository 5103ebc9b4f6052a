"""Wire types shared by the peer daemon, the management server and the client.

The network map is one JSON document per peer. Management computes it
(`management/netmap.py`), the peer applies it (`meshsshd/agent_map.py`), and the client
reads the peer list that comes from the same types. Everything here is a frozen
dataclass with `to_dict`/`from_dict` so that the JSON shape is defined in one place.

Schema history (bump SCHEMA_VERSION and add a line when the shape changes):
  1 — first version: self, peers, firewall rules, SSH section with inline JWKS.
      Additive since: an access rule may carry `accept_env` (older peers ignore it).
      Additive since: the SSH section may carry `agent_forwarding: false` (absent = true;
      older peers ignore it).
      Optional SSH `permit_open` (OpenSSH PermitOpen entries for -L/-D), added without a
      bump: absent means any, and peers that predate it ignore it.
      Optional SSH `permit_listen` (OpenSSH PermitListen entries for -R), likewise.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .config_values import number_problem
from .permit_open import PermitOpenError, parse_permit_listen, parse_permit_open, validate_entries

SCHEMA_VERSION = 1

# The port the embedded SSH server listens on; mesh traffic to 22 is redirected here.
SSH_PORT = 22022
REDIRECTED_SSH_PORT = 22

PROTOCOLS = ("tcp", "udp", "icmp", "all")

# An AcceptEnv pattern as sshd takes it: a variable name with `*` and `?` wildcards.
ENV_PATTERN = "[A-Za-z0-9_*?]{1,64}"  # management's policy API states it in its OpenAPI document
_ENV_PATTERN = re.compile(ENV_PATTERN)
MAX_ENV_PATTERNS = 64


class NetmapError(ValueError):
    """A network map (or one of its parts) does not have the expected shape."""


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise NetmapError(f"missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        raise NetmapError(f"field {key!r} has the wrong type")
    return value


def _whole_number(data: dict[str, Any], key: str) -> int:
    """A map's numbers are whole and finite (JSON's NaN, Infinity and 1e309 are not)."""
    value = _require(data, key, (int, float))
    if problem := number_problem(value, integer=True):
        raise NetmapError(f"field {key!r} {problem}")
    return int(value)


def _str(data: dict[str, Any], key: str, default: str) -> str:
    value = data.get(key, default) or default
    if not isinstance(value, str):
        raise NetmapError(f"field {key!r} must be a string")
    return value


def _tables(data: dict[str, Any], key: str, required: bool = False) -> list[dict[str, Any]]:
    value = _require(data, key, list) if required else data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise NetmapError(f"field {key!r} must be a list of objects")
    return value


def _str_list(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NetmapError(f"field {key!r} must be a list of strings")
    return tuple(value)


def check_accept_env(patterns: tuple[str, ...], where: str = "accept_env") -> tuple[str, ...]:
    """The patterns, or NetmapError naming the first bad one (shared by the TOML config,
    the map and management's policy API, so all three accept exactly the same)."""
    if len(patterns) > MAX_ENV_PATTERNS:
        raise NetmapError(f"{where}: at most {MAX_ENV_PATTERNS} patterns")
    for pattern in patterns:
        if not _ENV_PATTERN.fullmatch(pattern):
            raise NetmapError(f"{where}: {pattern[:70]!r} is not a variable name pattern "
                              "(letters, digits, '_', wildcards '*' and '?')")
    return patterns


@dataclass(frozen=True)
class AccessRule:
    """Who may log in as whom: source AND identity AND requested local user must match.

    Shared by the standalone TOML config (`[[access]]`) and the managed map's SSH
    section, so both modes are evaluated by the same code (`meshsshd/acl.py`).

    - sources: CIDRs the TCP connection may come from (a peer's mesh IP is a /32).
    - identities: JWT identity values, `*`, or `key:SHA256:...` public-key fingerprints.
    - local_users: names, `localpart` (the part of the identity before `@`), or `*`
      (any non-root user). `root` must be named explicitly and also needs root login on.
    - accept_env: the client variables (AcceptEnv patterns) sessions admitted by this
      rule keep; None means the server's `accept_env`. Not part of the match.
    """

    sources: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()
    local_users: tuple[str, ...] = ()
    accept_env: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for cidr in self.sources:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise NetmapError(f"access rule source {cidr!r} is not a CIDR") from exc
        if self.accept_env is not None:
            check_accept_env(self.accept_env, "access rule accept_env")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items() if v is not None}   # no accept_env: as before

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccessRule:
        return cls(
            sources=_str_list(data, "sources"),
            identities=_str_list(data, "identities"),
            local_users=_str_list(data, "local_users"),
            accept_env=_str_list(data, "accept_env") if data.get("accept_env") is not None else None,
        )


@dataclass(frozen=True)
class FirewallRule:
    """One inbound accept rule on the mesh interface; everything else is dropped.

    ports: "22", "8000-8080"; empty means every port of the protocol.
    """

    sources: tuple[str, ...]
    protocol: str = "tcp"
    ports: tuple[str, ...] = ()
    action: str = "accept"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise NetmapError(f"firewall rule protocol {self.protocol!r} is not one of {PROTOCOLS}")
        if self.action != "accept":
            raise NetmapError("firewall rules only accept; the default is deny")
        for port in self.ports:
            parse_port_range(port)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "protocol": self.protocol,
            "ports": list(self.ports),
            "action": self.action,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FirewallRule:
        return cls(
            sources=_str_list(data, "sources"),
            protocol=_str(data, "protocol", "tcp"),
            ports=_str_list(data, "ports"),
            action=_str(data, "action", "accept"),
        )


def parse_port_range(spec: str) -> tuple[int, int]:
    """"22" → (22, 22); "8000-8080" → (8000, 8080); raises NetmapError otherwise."""
    lo_s, _, hi_s = spec.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if hi_s else lo
    except ValueError as exc:
        raise NetmapError(f"port {spec!r} is not a number or range") from exc
    if not (1 <= lo <= hi <= 65535):
        raise NetmapError(f"port range {spec!r} is out of bounds")
    return lo, hi


@dataclass(frozen=True)
class PeerInfo:
    """A peer as others see it: enough to route to it, firewall it and check its host key."""

    id: str
    name: str
    fqdn: str
    mesh_ip: str
    wg_public_key: str = ""
    endpoints: tuple[str, ...] = ()
    ssh_host_keys: tuple[str, ...] = ()  # OpenSSH public-key lines: "ssh-ed25519 AAAA..."
    ssh_enabled: bool = False
    local_users: tuple[str, ...] = ()  # filled only in the per-user peer list
    groups: tuple[str, ...] = ()  # per-user peer list only: the peer's groups (`group:NAME` targets)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("endpoints", "ssh_host_keys", "local_users", "groups"):
            d[k] = list(d[k])
        if not d["groups"]:
            del d["groups"]  # network maps never carry it: their wire form stays as it was
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeerInfo:
        return cls(
            id=_require(data, "id", str),
            name=_require(data, "name", str),
            fqdn=_str(data, "fqdn", ""),
            mesh_ip=_require(data, "mesh_ip", str),
            wg_public_key=_str(data, "wg_public_key", ""),
            endpoints=_str_list(data, "endpoints"),
            ssh_host_keys=_str_list(data, "ssh_host_keys"),
            ssh_enabled=bool(data.get("ssh_enabled", False)),
            local_users=_str_list(data, "local_users"),
            groups=_str_list(data, "groups"),
        )


def _permit_entries(data: dict[str, Any], key: str,
                    parse: Callable[[Iterable[str]], object] = parse_permit_open) -> tuple[str, ...]:
    try:
        return validate_entries(_str_list(data, key), f"field '{key}'", parse)
    except PermitOpenError as exc:
        raise NetmapError(str(exc)) from exc


@dataclass(frozen=True)
class SSHSection:
    """What the peer's SSH server needs from management: who may log in as whom.

    jwks is the issuer's JWKS document inline, so peers validate tokens offline.
    audience is what this peer expects in `aud` (its own peer id).
    agent_forwarding false lets management refuse `ssh -A` on the peer; it can only
    narrow the peer's own setting (`up --disable-ssh-agent-forwarding`), never widen it.
    """

    enabled: bool = False
    issuer: str = ""
    audience: tuple[str, ...] = ()
    jwks: dict[str, Any] = field(default_factory=dict)
    user_claim: str = "sub"
    access: tuple[AccessRule, ...] = ()
    subsystems: dict[str, str] = field(default_factory=dict)
    agent_forwarding: bool = True
    permit_open: tuple[str, ...] = ()   # where -L/-D may connect; () = any (permit_open.py)
    permit_listen: tuple[str, ...] = ()   # where -R may listen; () = any, never wider than loopback/own IP

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "enabled": self.enabled,
            "issuer": self.issuer,
            "audience": list(self.audience),
            "jwks": self.jwks,
            "user_claim": self.user_claim,
            "access": [r.to_dict() for r in self.access],
            "subsystems": dict(self.subsystems),
        }
        if not self.agent_forwarding:   # absent when on: existing maps keep their wire form
            doc["agent_forwarding"] = False
        if self.permit_open:   # absent when unset, likewise
            doc["permit_open"] = list(self.permit_open)
        if self.permit_listen:
            doc["permit_listen"] = list(self.permit_listen)
        return doc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SSHSection:
        access = _tables(data, "access")
        subsystems = data.get("subsystems", {})
        if not isinstance(subsystems, dict) or not all(isinstance(v, str) for v in subsystems.values()):
            raise NetmapError("field 'subsystems' must map names to command lines")
        jwks = data.get("jwks", {})
        if not isinstance(jwks, dict):
            raise NetmapError("field 'jwks' must be an object")
        agent_forwarding = data.get("agent_forwarding", True)
        if not isinstance(agent_forwarding, bool):
            raise NetmapError("field 'agent_forwarding' must be true or false")
        return cls(
            enabled=bool(data.get("enabled", False)),
            issuer=_str(data, "issuer", ""),
            audience=_str_list(data, "audience"),
            jwks=jwks,
            user_claim=_str(data, "user_claim", "sub"),
            access=tuple(AccessRule.from_dict(r) for r in access),
            subsystems={str(k): str(v) for k, v in subsystems.items()},
            agent_forwarding=agent_forwarding,
            permit_open=_permit_entries(data, "permit_open"),
            permit_listen=_permit_entries(data, "permit_listen", parse_permit_listen),
        )


@dataclass(frozen=True)
class NetworkMap:
    """Everything one peer needs, with a serial that only grows."""

    serial: int
    peer: PeerInfo
    network: str
    peers: tuple[PeerInfo, ...] = ()
    firewall_rules: tuple[FirewallRule, ...] = ()
    ssh: SSHSection = field(default_factory=SSHSection)
    version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "serial": self.serial,
            "peer": self.peer.to_dict(),
            "network": self.network,
            "peers": [p.to_dict() for p in self.peers],
            "firewall_rules": [r.to_dict() for r in self.firewall_rules],
            "ssh": self.ssh.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkMap:
        if not isinstance(data, dict):
            raise NetmapError("a network map is a JSON object")
        version = data.get("version", SCHEMA_VERSION)
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise NetmapError(f"network map schema {version} is not supported (want {SCHEMA_VERSION})")
        peers = _tables(data, "peers", required=True)
        rules = _tables(data, "firewall_rules")
        ssh = data.get("ssh", {}) or {}
        if not isinstance(ssh, dict):
            raise NetmapError("field 'ssh' must be an object")
        return cls(
            serial=_whole_number(data, "serial"),
            peer=PeerInfo.from_dict(_require(data, "peer", dict)),
            network=_require(data, "network", str),
            peers=tuple(PeerInfo.from_dict(p) for p in peers),
            firewall_rules=tuple(FirewallRule.from_dict(r) for r in rules),
            ssh=SSHSection.from_dict(ssh),
            version=version,
        )
