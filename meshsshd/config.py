"""Server settings: one frozen value, built from a TOML file (standalone `meshsshd serve`)
or from a network map (managed `meshsshd up`), and validated when built.

"Where settings come from" lives here and in `agent.py`; "what the server does" lives in
`server.py`, which only ever sees a `ServerSettings`. A new value is applied whole
(`MeshSSHServer.apply`), so a half-valid change never reaches live sessions.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields, replace
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .config_values import number_problem, typed_problem
from .errors import ConfigError
from .netmap import SSH_PORT, AccessRule, NetmapError, NetworkMap, check_accept_env
from .idle import parse_channel_timeout, parse_duration
from .sshd_options import DEFAULT_REKEY_BYTES, DEFAULT_REKEY_SECONDS, parse_rekey_limit, read_banner
from .permit_open import PermitOpenError, parse_permit_listen, parse_permit_open, validate_entries

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


@dataclass(frozen=True)
class Limits:
    """OpenSSH-like limits asyncssh does not have (LoginGraceTime, MaxAuthTries, ...)."""

    login_grace: float = 30.0
    max_auth_tries: int = 6
    max_sessions: int = 10
    # Session channels one identity may hold open across all its connections.
    max_sessions_per_identity: int = 50
    # MaxStartups start:rate:full — beyond `start` unauthenticated connections, drop new
    # ones with probability rate% rising linearly to 100% at `full`.
    max_startups: tuple[int, int, int] = (10, 30, 100)
    # PerSourceMaxStartups: unauthenticated connections one address may hold (0 = no cap).
    per_source_max_startups: int = 0
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    # Per-source penalty after repeated auth failures (OpenSSH's PerSourcePenalties).
    penalty_failures: int = 10
    penalty_seconds: float = 30.0
    dial_timeout: float = 30.0
    # Detached sessions (docs/remoting-sessions.md): output bytes kept per session (oldest
    # dropped beyond), seconds a finished session stays listed, sessions per identity+user.
    detached_spool_bytes: int = 1 << 20
    detached_keep_seconds: float = 86400.0
    detached_max: int = 20


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


def _bool(table: dict[str, Any], key: str, default: bool = False) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false")
    return value


def _strings(table: dict[str, Any], key: str, default: tuple[Any, ...]) -> tuple[str, ...]:
    value = table.get(key)
    if value is None:
        return tuple(str(v) for v in default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of strings")
    return tuple(value)


def _number(table: dict[str, Any], key: str, default: float, where: str) -> float:
    """A finite, non-negative number: NaN or inf here would make a comparison never refuse."""
    value = table.get(key, default)
    if problem := number_problem(value):
        raise ConfigError(f"{where}{key} {problem}")
    return float(value)


def _string(table: dict[str, Any], key: str, default: str | None, where: str = "") -> Any:
    value = table.get(key, default)
    if value is not None and (not isinstance(value, str) or "\0" in value):
        raise ConfigError(f"{where}{key} must be a string")
    return value


def _limits(raw: dict[str, Any]) -> Limits:
    """[limits] checked field by field against the defaults' types (a field added to
    `Limits` later is validated the same way, with no code here)."""
    defaults = {f.name: f.default for f in fields(Limits)}
    unknown = set(raw) - set(defaults)
    if unknown:
        raise ConfigError(f"unknown key(s) in [limits]: {', '.join(sorted(map(str, unknown)))}")
    for key, value in raw.items():
        if problem := typed_problem(value, defaults[key]):
            raise ConfigError(f"limits.{key} {problem}")
    limits = Limits(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})
    full = limits.max_startups[2]
    if limits.per_source_max_startups > full:
        raise ConfigError(f"limits.per_source_max_startups {limits.per_source_max_startups} is above "
                          f"max_startups' full ({full}): one address could never reach it (0 = no cap)")
    return limits


def _permit_entries(data: dict[str, Any], key: str, syntax: str,
                    parse: Callable[[Iterable[str]], object]) -> tuple[str, ...]:
    """permit_open / permit_listen: a string or a list of strings, each entry parsed."""
    value = data.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
        raise ConfigError(f"{key} must be a list of {syntax}")
    try:
        return validate_entries(value, key, parse)
    except PermitOpenError as exc:
        raise ConfigError(str(exc)) from exc


def _audience(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError("jwt.audience must be a string or a list of strings")


KNOWN_KEYS = {
    "listen", "state_dir", "use_system_host_keys", "sftp", "local_port_forwarding",
    "remote_port_forwarding", "root_login", "disable_auth", "authorized_keys", "jwt",
    "access", "subsystems", "sftp_server", "limits", "own_addresses", "metrics_listen",
    "accept_env", "nologin_files",
    "agent_forwarding",
    "permit_open",
    "permit_listen",
    "strict_algorithms",
    "banner", "force_command", "rekey_limit", "channel_timeout", "unused_connection_timeout",
}
JWT_KEYS = {"issuer", "audience", "jwks_file", "jwks_url", "max_token_age", "leeway", "user_claim"}


def _check_jwks_source(jwt: JWTSettings) -> None:
    """The key source decides who may log in: an https URL (http only to loopback) and
    a file no other user may change."""
    from .jwks import file_problem, url_problem

    if jwt.jwks_url is not None and (problem := url_problem(str(jwt.jwks_url))):
        raise ConfigError(f"jwt.jwks_url: {problem}")
    if jwt.jwks_file is not None and (problem := file_problem(jwt.jwks_file)):
        raise ConfigError(f"jwt.jwks_file: {problem}")


def settings_from_toml(path: Path) -> ServerSettings:
    """Read and validate a standalone config file; every problem names its key."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return settings_from_dict(data, base_dir=path.parent)


def settings_from_dict(data: dict[str, Any], base_dir: Path = Path(".")) -> ServerSettings:
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s): {', '.join(sorted(unknown))}")
    listen_raw = data.get("listen", [f"127.0.0.1:{SSH_PORT}"])
    if isinstance(listen_raw, str):
        listen_raw = [listen_raw]
    if not isinstance(listen_raw, list) or not listen_raw:
        raise ConfigError("listen must be a non-empty list of host:port")
    jwt_raw = data.get("jwt", {})
    if not isinstance(jwt_raw, dict):
        raise ConfigError("[jwt] must be a table")
    unknown = set(jwt_raw) - JWT_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) in [jwt]: {', '.join(sorted(unknown))}")
    jwks_file = _string(jwt_raw, "jwks_file", None, "jwt.")
    jwt = JWTSettings(
        issuer=_string(jwt_raw, "issuer", "", "jwt."),
        audience=_audience(jwt_raw["audience"]) if "audience" in jwt_raw else (),
        jwks_file=(base_dir / jwks_file) if jwks_file else None,
        jwks_url=_string(jwt_raw, "jwks_url", None, "jwt."),
        max_token_age=_number(jwt_raw, "max_token_age", 600, "jwt."),
        leeway=_number(jwt_raw, "leeway", 30, "jwt."),
        user_claim=_string(jwt_raw, "user_claim", "sub", "jwt."),
    )
    _check_jwks_source(jwt)
    access_raw = data.get("access", [])
    if not isinstance(access_raw, list) or not all(isinstance(r, dict) for r in access_raw):
        raise ConfigError("[[access]] must be an array of tables")
    try:
        access = tuple(AccessRule.from_dict(r) for r in access_raw)
    except NetmapError as exc:
        raise ConfigError(f"[[access]]: {exc}") from exc
    subsystems = data.get("subsystems", {})
    if not isinstance(subsystems, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in subsystems.items()
    ):
        raise ConfigError("[subsystems] must map names to command lines")
    limits_raw = data.get("limits", {})
    if not isinstance(limits_raw, dict):
        raise ConfigError("[limits] must be a table")
    limits = _limits(limits_raw)
    metrics = _string(data, "metrics_listen", None)
    try:
        accept_env = check_accept_env(_strings(data, "accept_env", DEFAULT_ACCEPT_ENV))
    except NetmapError as exc:
        raise ConfigError(str(exc)) from exc
    nologin_files = tuple(Path(p) for p in _strings(data, "nologin_files", DEFAULT_NOLOGIN_FILES))
    if not all(p.is_absolute() for p in nologin_files):
        raise ConfigError("nologin_files must be absolute paths")
    permit_open = _permit_entries(data, "permit_open", "host:port entries (OpenSSH PermitOpen syntax)",
                                  parse_permit_open)
    permit_listen = _permit_entries(data, "permit_listen", "[host:]port entries (OpenSSH PermitListen syntax)",
                                    parse_permit_listen)
    settings = ServerSettings(
        listen=tuple(parse_listen(s) for s in listen_raw),
        state_dir=Path(_string(data, "state_dir", str(DEFAULT_STATE_DIR))),
        use_system_host_keys=_bool(data, "use_system_host_keys"),
        sftp=_bool(data, "sftp"),
        local_port_forwarding=_bool(data, "local_port_forwarding"),
        remote_port_forwarding=_bool(data, "remote_port_forwarding"),
        root_login=_bool(data, "root_login"),
        disable_auth=_bool(data, "disable_auth"),
        authorized_keys=_bool(data, "authorized_keys"),
        jwt=jwt,
        access=access,
        subsystems=dict(subsystems),
        sftp_server=_string(data, "sftp_server", None) or find_sftp_server(),
        limits=limits,
        own_addresses=_strings(data, "own_addresses", ()),
        metrics_listen=parse_listen(metrics) if metrics else None,
        accept_env=accept_env,
        nologin_files=nologin_files,
        agent_forwarding=_bool(data, "agent_forwarding", True),
        permit_open=permit_open,
        permit_listen=permit_listen,
        strict_algorithms=_bool(data, "strict_algorithms"),
        banner=read_banner(banner_path) if (banner_path := _string(data, "banner", None)) else "",
        force_command=_string(data, "force_command", None) or None,
        rekey_limit=parse_rekey_limit(_string(data, "rekey_limit", "default")),
        channel_timeout=parse_channel_timeout(t) if (t := _string(data, "channel_timeout", None)) else 0.0,
        unused_connection_timeout=(parse_duration(u, "unused_connection_timeout")
                                   if (u := _string(data, "unused_connection_timeout", None)) else 0.0),
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
