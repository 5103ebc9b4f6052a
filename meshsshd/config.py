"""Server settings: one frozen value, built from a TOML file (standalone `meshsshd serve`)
or from a network map (managed `meshsshd up`), and validated when built.

"Where settings come from" lives here and in `agent_map.py`; "what the server does" lives in
`server.py`, which only ever sees a `ServerSettings`. A new value is applied whole
(`MeshSSHServer.apply`), so a half-valid change never reaches live sessions.

The file is checked whole against one typed schema, `ConfigFile` (msgspec, through
`schema.py`): unknown keys (with the nearest valid one suggested), wrong types and
bounds fail with the file and the key path named, the same at start and on SIGHUP.
Only what a type cannot say (addresses, durations, CIDRs) is parsed afterwards.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import msgspec

from .errors import ConfigError
from .netmap import SSH_PORT, AccessRule, NetmapError, NetworkMap, check_accept_env
from .idle import parse_channel_timeout, parse_duration
from .sshd_options import DEFAULT_REKEY_BYTES, DEFAULT_REKEY_SECONDS, parse_rekey_limit, read_banner
from .permit_open import PermitOpenError, parse_permit_listen, parse_permit_open, validate_entries
from .schema import AbsolutePath, Count, Percent, PositiveSeconds, Quota, SchemaError, Seconds, Text, convert, load_toml

DEFAULT_STATE_DIR = Path("/var/lib/meshsshd")
SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
)
# Client variables sessions keep (sshd's AcceptEnv patterns) unless the admitting access
# rule says otherwise: `LANG LC_*` as Debian ships sshd (upstream's default is none).
# Anything wider lets a client steer the user's programs (EDITOR, PAGER, LESSOPEN, TZ
# file paths), which matters most where a forced command is the whole point.
DEFAULT_ACCEPT_ENV = ("LANG", "LC_*")
# Files whose existence stops non-root logins (sshd's _PATH_NOLOGIN; pam_nologin also
# reads /run/nologin, which systemd creates before a scheduled shutdown).
DEFAULT_NOLOGIN_FILES = (Path("/etc/nologin"), Path("/run/nologin"))


@dataclass(frozen=True)
class JWTSettings:
    """How tokens are checked. jwks (inline document) wins over jwks_file over jwks_url."""

    issuer: str = ""
    audience: tuple[str, ...] = ()
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks: dict[str, Any] | None = None
    max_token_age: float = 600.0
    leeway: float = 30.0
    user_claim: str = "sub"

    @property
    def configured(self) -> bool:
        return bool(self.issuer and self.audience and (self.jwks or self.jwks_file or self.jwks_url))


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """OpenSSH-like limits asyncssh does not have (LoginGraceTime, MaxAuthTries, ...).
    The [limits] table and the value the server reads are this one type: each field's
    bounds are in its type, so a file cannot hold a limit the server cannot use."""

    login_grace: Seconds = 30.0   # 0 = no limit
    max_auth_tries: Count = 6
    max_sessions: Count = 10
    # Session channels one identity may hold open across all its connections.
    max_sessions_per_identity: Count = 50
    # MaxStartups start:rate:full — beyond `start` unauthenticated connections, drop new
    # ones with probability rate% rising linearly to 100% at `full`.
    max_startups: tuple[Count, Percent, Count] = (10, 30, 100)
    # PerSourceMaxStartups: unauthenticated connections one address may hold (0 = no cap).
    per_source_max_startups: Quota = 0
    keepalive_interval: Seconds = 15.0   # 0 = off
    keepalive_count_max: Count = 3       # asyncssh refuses 0 when it listens
    # Per-source penalty after repeated auth failures (OpenSSH's PerSourcePenalties; 0 = off).
    penalty_failures: Quota = 10
    penalty_seconds: Seconds = 30.0
    dial_timeout: PositiveSeconds = 30.0   # 0 would time every -L out at once
    # Detached sessions (docs/remoting-sessions.md): output bytes kept per session (oldest
    # dropped beyond), seconds a finished session stays listed, sessions per identity+user.
    detached_spool_bytes: Count = 1 << 20
    detached_keep_seconds: Seconds = 86400.0
    detached_max: Quota = 20   # 0 = no detached sessions

    def __post_init__(self) -> None:
        """What no single bound says: the relation between fields (msgspec reports a
        ValueError here at `limits`)."""
        start, _rate, full = self.max_startups
        if start > full:
            raise ValueError(f"max_startups' start ({start}) is above its full ({full}): "
                             "write start:rate:full with start <= full, as OpenSSH's MaxStartups")
        if self.per_source_max_startups > full:
            raise ValueError(f"per_source_max_startups {self.per_source_max_startups} is above "
                             f"max_startups' full ({full}): one address could never reach it (0 = no cap)")


@dataclass(frozen=True)
class ServerSettings:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", SSH_PORT),)
    state_dir: Path = DEFAULT_STATE_DIR
    use_system_host_keys: bool = False
    sftp: bool = False
    local_port_forwarding: bool = False
    remote_port_forwarding: bool = False
    root_login: bool = False
    disable_auth: bool = False
    authorized_keys: bool = False
    jwt: JWTSettings = field(default_factory=JWTSettings)
    access: tuple[AccessRule, ...] = ()
    subsystems: dict[str, str] = field(default_factory=dict)
    sftp_server: str | None = None
    limits: Limits = field(default_factory=Limits)
    # Addresses a -R forward may bind besides loopback (the peer's own mesh IP).
    own_addresses: tuple[str, ...] = ()
    metrics_listen: tuple[str, int] | None = None
    accept_env: tuple[str, ...] = DEFAULT_ACCEPT_ENV
    nologin_files: tuple[Path, ...] = DEFAULT_NOLOGIN_FILES
    # `ssh -A` (OpenSSH's AllowAgentForwarding, on by default there too).
    agent_forwarding: bool = True
    # Where `ssh -L`/`-D` may connect (OpenSSH PermitOpen entries; () = any), and what is
    # refused unless listed there besides link-local (the management server's address).
    permit_open: tuple[str, ...] = ()
    forward_protected: tuple[str, ...] = ()
    # Where `ssh -R` may listen (OpenSSH PermitListen entries; () = any), within what
    # `forwarding.may_listen` allows at all (loopback, own_addresses).
    permit_listen: tuple[str, ...] = ()
    # Only encrypt-then-MAC MACs (no hmac-sha2-256/512 for libssh2 < 1.11 clients).
    strict_algorithms: bool = False
    # sshd's Banner (the file's text, read at load), ForceCommand and RekeyLimit.
    banner: str = ""
    force_command: str | None = None
    rekey_limit: tuple[int, int] = (DEFAULT_REKEY_BYTES, DEFAULT_REKEY_SECONDS)
    # sshd's ChannelTimeout session=… and UnusedConnectionTimeout, in seconds (0 = off).
    channel_timeout: float = 0.0
    unused_connection_timeout: float = 0.0
    # Built by `meshsshd up` (flags and the network map), not from a TOML file: what a
    # refusal tells the user to change (`meshsshd/remedies.py`) depends on it.
    managed: bool = False

    def with_(self, **changes: Any) -> ServerSettings:
        return replace(self, **changes)


def format_listen(addr: tuple[str, int]) -> str:
    """The inverse of parse_listen (brackets for IPv6)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(spec: str) -> tuple[str, int]:
    """"127.0.0.1:22022", "[::1]:22022", "0.0.0.0" → (host, port); port defaults to 22022."""
    if not isinstance(spec, str):
        raise ConfigError(f"listen address {spec!r} must be a string \"host:port\"")
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port_s = rest.lstrip(":")
    elif spec.count(":") == 1:
        host, _, port_s = spec.partition(":")
    else:
        host, port_s = spec, ""
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"listen address {spec!r}: {host!r} is not an IP address") from exc
    if port_s and not (port_s.isascii() and port_s.isdigit()):
        raise ConfigError(f"listen address {spec!r}: port is not a number")
    port = int(port_s) if port_s else SSH_PORT
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen address {spec!r}: port out of range")
    return host, port


def find_sftp_server() -> str | None:
    for candidate in SFTP_SERVER_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return None


class _JwtTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """[jwt]: the file's spelling of `JWTSettings` (one audience or a list, a key file
    relative to the config file; the inline JWKS comes only from a network map)."""

    issuer: Text = JWTSettings.issuer
    audience: Text | tuple[Text, ...] = JWTSettings.audience
    jwks_file: Text | None = JWTSettings.jwks_file
    jwks_url: Text | None = JWTSettings.jwks_url
    max_token_age: Seconds = JWTSettings.max_token_age
    leeway: Seconds = JWTSettings.leeway
    user_claim: Text = JWTSettings.user_claim


class _AccessTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One [[access]] rule; `AccessRule` itself then checks the CIDRs and patterns, as it
    does for a network map."""

    sources: tuple[Text, ...] = AccessRule.sources
    identities: tuple[Text, ...] = AccessRule.identities
    local_users: tuple[Text, ...] = AccessRule.local_users
    accept_env: tuple[Text, ...] | None = AccessRule.accept_env


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The whole standalone config file, every key with its type, bounds and default
    (those of `ServerSettings`). msgspec checks a document against it in one pass
    (`schema.convert`); what a type cannot say (an IP address, a duration, a CIDR) is
    parsed after, by the parser each value already has."""

    listen: Text | Annotated[tuple[Text, ...], msgspec.Meta(min_length=1)] = tuple(
        format_listen(a) for a in ServerSettings.listen)
    state_dir: Text = str(ServerSettings.state_dir)
    use_system_host_keys: bool = ServerSettings.use_system_host_keys
    sftp: bool = ServerSettings.sftp
    local_port_forwarding: bool = ServerSettings.local_port_forwarding
    remote_port_forwarding: bool = ServerSettings.remote_port_forwarding
    root_login: bool = ServerSettings.root_login
    disable_auth: bool = ServerSettings.disable_auth
    authorized_keys: bool = ServerSettings.authorized_keys
    jwt: _JwtTable = msgspec.field(default_factory=_JwtTable)
    access: tuple[_AccessTable, ...] = ()
    subsystems: dict[Text, Text] = {}
    sftp_server: Text | None = None   # None: the first of SFTP_SERVER_CANDIDATES
    limits: Limits = msgspec.field(default_factory=Limits)
    own_addresses: tuple[Text, ...] = ServerSettings.own_addresses
    metrics_listen: Text | None = None
    accept_env: tuple[Text, ...] = ServerSettings.accept_env
    nologin_files: tuple[AbsolutePath, ...] = tuple(str(p) for p in ServerSettings.nologin_files)
    agent_forwarding: bool = ServerSettings.agent_forwarding
    permit_open: Text | tuple[Text, ...] = ServerSettings.permit_open
    permit_listen: Text | tuple[Text, ...] = ServerSettings.permit_listen
    strict_algorithms: bool = ServerSettings.strict_algorithms
    banner: AbsolutePath | None = None
    force_command: Text | None = ServerSettings.force_command
    rekey_limit: Text = "default"
    channel_timeout: Text | None = None
    unused_connection_timeout: Text | None = None


def _entries(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """A key that takes one string or a list of them."""
    return (value,) if isinstance(value, str) else value


def _permit_entries(entries: tuple[str, ...], key: str, parse: Callable[[Iterable[str]], object]) -> tuple[str, ...]:
    try:
        return validate_entries(entries, key, parse)
    except PermitOpenError as exc:
        raise ConfigError(str(exc)) from exc


def _access(rules: tuple[_AccessTable, ...]) -> tuple[AccessRule, ...]:
    built = []
    for i, rule in enumerate(rules):
        try:
            built.append(AccessRule(**msgspec.structs.asdict(rule)))
        except NetmapError as exc:
            raise ConfigError(f"key `access[{i}]`: {exc}") from exc
    return tuple(built)


def _check_jwks_source(jwt: JWTSettings) -> None:
    """The key source decides who may log in: an https URL (http only to loopback) and
    a file no other user may change."""
    from .jwks import file_problem, url_problem

    if jwt.jwks_url is not None and (problem := url_problem(str(jwt.jwks_url))):
        raise ConfigError(f"jwt.jwks_url: {problem}")
    if jwt.jwks_file is not None and (problem := file_problem(jwt.jwks_file)):
        raise ConfigError(f"jwt.jwks_file: {problem}")


def settings_from_toml(path: Path) -> ServerSettings:
    """Read and validate a standalone config file; every problem names the file and its key."""
    try:
        doc = load_toml(path, ConfigFile)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    return _settings(doc, base_dir=path.parent, source=str(path))


def settings_from_dict(data: dict[str, Any], base_dir: Path = Path("."), source: str = "config") -> ServerSettings:
    """A parsed document (tests, tools) checked as a file would be; `source` names it in errors."""
    try:
        doc = convert(data, ConfigFile, source=source)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    return _settings(doc, base_dir, source)


def _settings(doc: ConfigFile, base_dir: Path, source: str) -> ServerSettings:
    try:
        return _build(doc, base_dir)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _build(doc: ConfigFile, base_dir: Path) -> ServerSettings:
    """The values the schema admitted, parsed into what the server uses."""
    j = doc.jwt
    jwt = JWTSettings(issuer=j.issuer, audience=_entries(j.audience),
                      jwks_file=(base_dir / j.jwks_file) if j.jwks_file else None, jwks_url=j.jwks_url,
                      max_token_age=j.max_token_age, leeway=j.leeway, user_claim=j.user_claim)
    _check_jwks_source(jwt)
    try:
        accept_env = check_accept_env(doc.accept_env)
    except NetmapError as exc:
        raise ConfigError(str(exc)) from exc
    settings = ServerSettings(
        listen=tuple(parse_listen(s) for s in _entries(doc.listen)),
        state_dir=Path(doc.state_dir),
        use_system_host_keys=doc.use_system_host_keys,
        sftp=doc.sftp,
        local_port_forwarding=doc.local_port_forwarding,
        remote_port_forwarding=doc.remote_port_forwarding,
        root_login=doc.root_login,
        disable_auth=doc.disable_auth,
        authorized_keys=doc.authorized_keys,
        jwt=jwt,
        access=_access(doc.access),
        subsystems=dict(doc.subsystems),
        sftp_server=doc.sftp_server or find_sftp_server(),
        limits=doc.limits,
        own_addresses=doc.own_addresses,
        metrics_listen=parse_listen(doc.metrics_listen) if doc.metrics_listen else None,
        accept_env=accept_env,
        nologin_files=tuple(Path(p) for p in doc.nologin_files),
        agent_forwarding=doc.agent_forwarding,
        permit_open=_permit_entries(_entries(doc.permit_open), "permit_open", parse_permit_open),
        permit_listen=_permit_entries(_entries(doc.permit_listen), "permit_listen", parse_permit_listen),
        strict_algorithms=doc.strict_algorithms,
        banner=read_banner(doc.banner) if doc.banner else "",
        force_command=doc.force_command or None,
        rekey_limit=parse_rekey_limit(doc.rekey_limit),
        channel_timeout=parse_channel_timeout(doc.channel_timeout) if doc.channel_timeout else 0.0,
        unused_connection_timeout=(parse_duration(doc.unused_connection_timeout, "unused_connection_timeout")
                                   if doc.unused_connection_timeout else 0.0),
    )
    if not settings.disable_auth and not settings.authorized_keys and not settings.jwt.configured:
        raise ConfigError(
            "no way to log in: configure [jwt] (issuer, audience, jwks_file or jwks_url), "
            "or set authorized_keys = true, or disable_auth = true"
        )
    return settings


def settings_from_netmap(base: ServerSettings, netmap: NetworkMap) -> ServerSettings:
    """The managed mode: local flags and state stay, who-may-log-in comes from the map."""
    ssh = netmap.ssh
    return base.with_(
        jwt=JWTSettings(
            issuer=ssh.issuer,
            audience=ssh.audience or (netmap.peer.id,),
            jwks=ssh.jwks,
            max_token_age=base.jwt.max_token_age,
            leeway=base.jwt.leeway,
            user_claim=ssh.user_claim,
        ),
        access=ssh.access,
        subsystems={**base.subsystems, **ssh.subsystems},
        own_addresses=(netmap.peer.mesh_ip,),
        agent_forwarding=base.agent_forwarding and ssh.agent_forwarding,
        permit_open=ssh.permit_open,
        permit_listen=ssh.permit_listen,
    )
