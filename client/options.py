"""The `meshssh [options] [user@]host [command ...]` command line, parsed as OpenSSH does.

Pure: argv in, a frozen `SSHArgs` out, `UsageError` for anything wrong. OpenSSH's
rules kept here: single-letter options may be bundled (`-tt`, `-vvv`, `-NL8080:h:80`),
an option's value may be attached or the next word, options may also follow the
destination (`ssh host -p 2222 ls`), the first word after the destination that is not
an option starts the command, `--` ends the options, and the command words are joined
with spaces (the remote shell splits them again).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

DEFAULT_BUDGET = 10  # tokens one connection's broker mints before refusing (--delegate-max)

# Letters OpenSSH knows; those we do not implement are refused by name, not ignored.
NOARG = set("46AaCfGgKkMNnqsTtVvXxYy")
WITHARG = set("BbcDEeFIiJLlmOoPpQRSWw")
SUPPORTED = set("46AaCNnqsTtvVbDiLlopR")
LONG_WITHARG = {"--ssh-jwt-cache-ttl", "--delegate-to", "--delegate-max"}
LONG_NOARG = {"--no-cache", "--help", "--delegate-confirm", "--version"}
# `meshssh WORD ...` that are sub-commands, not destinations (client/cli.py, client/front.py).
SUBCOMMANDS = ("login", "logout", "detect", "proxy", "config", "cp", "peers", "passwd", "exec", "sessions",
               "attach", "receive", "control", "completion")


@dataclass(frozen=True)
class Forward:
    """One -L/-R/-D spec. dest_host is None for -D (SOCKS)."""

    listen_host: str
    listen_port: int
    dest_host: str | None = None
    dest_port: int = 0


@dataclass(frozen=True)
class SSHArgs:
    destination: str
    user: str | None = None
    port: int | None = None
    command: tuple[str, ...] = ()
    tty: int = 0  # count of -t; -1 for -T
    tty_override: int = 0  # -o RequestTTY: 1 yes, 2 force, -1 no, 0 auto
    no_command: bool = False  # -N
    stdin_null: bool = False  # -n
    local: tuple[Forward, ...] = ()
    remote: tuple[Forward, ...] = ()
    dynamic: tuple[Forward, ...] = ()
    agent: bool | None = None  # -A True, -a False, None: ForwardAgent default (no)
    identities: tuple[str, ...] = ()
    verbose: int = 0
    quiet: bool = False
    bind_address: str | None = None
    address_family: int = 0  # 4, 6 or 0
    options: tuple[tuple[str, str], ...] = ()  # -o, lower-cased keys, in order
    ssh_jwt_cache_ttl: str | None = None
    no_cache: bool = False
    delegate_to: tuple[str, ...] = ()  # --delegate-to: token delegation (client/broker.py)
    delegate_max: int | None = None  # --delegate-max N: tokens per connection (None: the default)
    delegate_confirm: bool = False  # --delegate-confirm: ask (askpass) before each token
    send_env: tuple[str, ...] = ()
    set_env: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()  # shown on stderr before connecting (like ssh's)
    subsystem: bool = False  # -s: the command is the name of a subsystem (sftp, powershell, ...)

    @property
    def remote_command(self) -> str | None:
        return " ".join(self.command) if self.command else None

    def option(self, key: str) -> str | None:
        """First value wins, as in ssh_config."""
        for k, v in self.options:
            if k == key.lower():
                return v
        return None


def parse_port(text: str, what: str = "port") -> int:
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"Bad {what} '{text}'") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"Bad {what} '{text}'")
    return port


def _split_fields(spec: str) -> list[str]:
    """Split on ':' (or '/', OpenSSH's alternative) keeping [IPv6] brackets together."""
    sep = "/" if "/" in spec and "[" not in spec else ":"
    out: list[str] = []
    cur = ""
    depth = 0
    for ch in spec:
        if ch == "[":
            depth += 1
            continue
        if ch == "]":
            depth -= 1
            continue
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def parse_forward(spec: str, kind: str) -> Forward:
    """-L/-R: [bind:]port:host:hostport; -D: [bind:]port. OpenSSH's default binds."""
    fields = _split_fields(spec.strip())
    if kind == "D":
        if len(fields) == 1:
            return Forward("localhost", parse_port(fields[0], "dynamic forward port"))
        if len(fields) == 2:
            return Forward(_bind(fields[0], kind), parse_port(fields[1], "dynamic forward port"))
        raise UsageError(f"Bad dynamic forwarding specification '{spec}'")
    what = "local" if kind == "L" else "remote"
    if len(fields) == 3:
        bind, port, host, hport = "", fields[0], fields[1], fields[2]
        explicit_bind = False
    elif len(fields) == 4:
        bind, port, host, hport = fields
        explicit_bind = True
    elif kind == "R" and len(fields) in (1, 2):
        raise UsageError("dynamic remote forwarding (-R [bind:]port) is not supported")
    else:
        raise UsageError(f"Bad {what} forwarding specification '{spec}'")
    if not host:
        raise UsageError(f"Bad {what} forwarding specification '{spec}'")
    listen_host = _bind(bind, kind) if explicit_bind else "localhost"
    return Forward(listen_host, parse_port(port, f"{what} forward port"), host,
                   parse_port(hport, f"{what} forward destination port"))


def _bind(text: str, kind: str) -> str:
    if text in ("", "*"):
        return "" if kind == "R" else "0.0.0.0"
    return text


def first_word(argv: list[str]) -> int | None:
    """Index of the first word that is not an option or an option's value (the
    destination or a sub-command), or None."""
    return _scan(argv)[0]


def wants_version(argv: list[str]) -> bool:
    """`-V` anywhere among the options (bundled too, as `-vV`), or `--version`: ssh prints
    its version and exits whatever else the line says."""
    return "V" in _scan(argv)[1]


def _scan(argv: list[str]) -> tuple[int | None, set[str]]:
    """(index of the first word, the flag letters before it); `--version` counts as V."""
    letters: set[str] = set()
    i = 0
    while i < len(argv):
        w = argv[i]
        if w == "--":
            return (i + 1 if i + 1 < len(argv) else None), letters
        if not w.startswith("-") or w == "-":
            return i, letters
        if w.startswith("--"):
            if w == "--version":
                letters.add("V")
            if w in LONG_WITHARG:
                i += 1
        else:
            # bundled: the first letter that takes a value consumes the rest or the next word
            for j, ch in enumerate(w[1:], start=1):
                if ch in WITHARG:
                    if j == len(w) - 1:
                        i += 1
                    break
                letters.add(ch)
        i += 1
    return None, letters


def split_destination(dest: str) -> tuple[str | None, str, int | None]:
    """user@host, ssh://[user@]host[:port]; the last '@' separates the user."""
    port = None
    if dest.startswith("ssh://"):
        dest = dest[len("ssh://"):].rstrip("/")
        user, _, hostport = dest.rpartition("@")
        if hostport.startswith("["):
            host, _, rest = hostport[1:].partition("]")
            if rest.startswith(":"):
                port = parse_port(rest[1:])
        elif hostport.count(":") == 1:
            host, _, p = hostport.partition(":")
            port = parse_port(p)
        else:
            host = hostport
        return (user or None), host, port
    user, _, host = dest.rpartition("@")
    if not host:
        raise UsageError(f"bad destination {dest!r}")
    return (user or None), host, port


def _yes(value: str) -> bool:
    return value.strip().lower() in ("yes", "true", "1")


def parse_ssh_args(argv: list[str]) -> SSHArgs:
    kw: dict = {"local": [], "remote": [], "dynamic": [], "identities": [], "options": [],
                "command": [], "send_env": [], "set_env": [], "warnings": []}
    dest: str | None = None
    tty = 0
    i = 0
    verbose = 0
    options_done = False
    while i < len(argv):
        word = argv[i]
        i += 1
        if not options_done and word == "--":
            options_done = True
            continue
        if options_done or not word.startswith("-") or word == "-":
            if dest is None:
                dest = word
                continue
            kw["command"] = argv[i - 1:]
            break
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            if name in LONG_WITHARG:
                if not eq:
                    if i >= len(argv):
                        raise UsageError(f"option {name} needs a value")
                    value = argv[i]
                    i += 1
                if name == "--delegate-to":
                    kw.setdefault("delegate_to", []).append(value)
                elif name == "--delegate-max":

                    kw["delegate_max"] = parse_budget(value)
                else:
                    kw["ssh_jwt_cache_ttl"] = value
            elif name == "--no-cache":
                kw["no_cache"] = True
            elif name == "--delegate-confirm":
                kw["delegate_confirm"] = True
            else:
                raise UsageError(f"unknown option {word}")
            continue
        j = 1
        while j < len(word):
            ch = word[j]
            j += 1
            if ch in WITHARG:
                value = word[j:]
                if not value:
                    if i >= len(argv):
                        raise UsageError(f"option requires an argument -- {ch}")
                    value = argv[i]
                    i += 1
                _apply_arg(kw, ch, value)
                break
            if ch not in NOARG:
                raise UsageError(f"unknown option -- {ch}")
            if ch not in SUPPORTED:
                raise UsageError(f"option -{ch} is not supported by meshssh")
            if ch == "t":
                tty = max(tty, 0) + 1
            elif ch == "T":
                tty = -1
            elif ch == "N":
                kw["no_command"] = True
            elif ch == "n":
                kw["stdin_null"] = True
            elif ch == "A":
                kw["agent"] = True
            elif ch == "a":
                kw["agent"] = False
            elif ch == "v":
                verbose += 1
            elif ch == "s":
                kw["subsystem"] = True
            elif ch == "q":
                kw["quiet"] = True
            elif ch in "46":
                kw["address_family"] = int(ch)
            # -C (compression) is accepted and ignored: asyncssh prefers none.
    if dest is None:
        raise UsageError("no destination given")
    user, host, port = split_destination(dest)
    kw["user"] = kw.get("user") or user
    if port is not None and "port" not in kw:
        kw["port"] = port
    _apply_options(kw)
    if kw.get("subsystem") and not kw["command"]:
        raise UsageError("-s needs the subsystem name as the command")
    if kw.get("no_command") and kw["command"]:
        kw["no_command"] = False  # OpenSSH runs the command anyway
    return SSHArgs(
        destination=host, tty=tty, verbose=verbose,
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()},
    )


def _apply_arg(kw: dict, ch: str, value: str) -> None:
    if ch not in SUPPORTED:
        raise UsageError(f"option -{ch} is not supported by meshssh")
    if ch == "p":
        kw["port"] = parse_port(value)
    elif ch == "l":
        kw["user"] = value
    elif ch == "L":
        kw["local"].append(parse_forward(value, "L"))
    elif ch == "R":
        kw["remote"].append(parse_forward(value, "R"))
    elif ch == "D":
        kw["dynamic"].append(parse_forward(value, "D"))
    elif ch == "i":
        kw["identities"].append(value)
    elif ch == "b":
        kw["bind_address"] = value
    elif ch == "o":
        key, sep, val = value.partition("=")
        if not sep:
            key, _, val = value.strip().partition(" ")
        key = key.strip().lower()
        if not key:
            raise UsageError(f"bad -o option {value!r}")
        kw["options"].append((key, val.strip().strip('"')))


# -o keys read where they are used (connect.py) or that change nothing for meshssh.
_HANDLED_ELSEWHERE = {"serveraliveinterval", "connecttimeout", "exitonforwardfailure", "port",
                      "user", "forwardagent", "requesttty", "identityfile", "bindaddress",
                      "localforward", "remoteforward", "dynamicforward", "sendenv", "setenv"}
_HARMLESS = {"batchmode", "loglevel", "compression", "serveralivecountmax", "tcpkeepalive",
             "identitiesonly", "passwordauthentication", "pubkeyauthentication",
             "kbdinteractiveauthentication", "preferredauthentications", "addkeystoagent"}
_HOSTKEY_OPTIONS = {"stricthostkeychecking", "userknownhostsfile", "globalknownhostsfile",
                    "checkhostip", "hostkeyalias", "updatehostkeys", "verifyhostkeydns"}


def _apply_options(kw: dict) -> None:
    """The -o keys meshssh understands; first value wins as in ssh_config."""
    seen: set[str] = set()
    for key, val in kw["options"]:
        first = key not in seen
        seen.add(key)
        if key == "port" and first and "port" not in kw:
            kw["port"] = parse_port(val)
        elif key == "user" and first and not kw.get("user"):
            kw["user"] = val
        elif key == "forwardagent" and first and "agent" not in kw:
            kw["agent"] = _yes(val)
        elif key == "requesttty" and first:
            kw["_requesttty"] = val.lower()
        elif key == "identityfile":
            kw["identities"].append(val)
        elif key == "bindaddress" and first and not kw.get("bind_address"):
            kw["bind_address"] = val
        elif key == "localforward":
            kw["local"].append(parse_forward(val.replace(" ", ":", 1), "L"))
        elif key == "remoteforward":
            kw["remote"].append(parse_forward(val.replace(" ", ":", 1), "R"))
        elif key == "dynamicforward":
            kw["dynamic"].append(parse_forward(val, "D"))
        elif key == "sendenv":
            kw["send_env"].extend(val.split())
        elif key == "setenv":
            for item in val.split():
                name, eq, v = item.partition("=")
                if not eq or not name:
                    raise UsageError(f"bad SetEnv {item!r}")
                kw["set_env"].append((name, v))
        elif key in _HOSTKEY_OPTIONS:
            kw["warnings"].append(f"ignoring -o {key}: meshssh always checks the peer's host "
                                  "key against management's list (no known_hosts, no TOFU)")
        elif key not in _HANDLED_ELSEWHERE and key not in _HARMLESS:
            kw["warnings"].append(f"ignoring unsupported option -o {key}")
    mode = kw.pop("_requesttty", None)
    if mode is not None:
        kw["tty_override"] = {"yes": 1, "force": 2, "no": -1, "auto": 0}.get(mode, 0)


def want_pty(args: SSHArgs, stdin_isatty: bool) -> bool:
    """OpenSSH's rule: -T never; -tt always; -t or no command only with a local tty."""
    tty = args.tty if args.tty != 0 else args.tty_override
    if args.subsystem and tty < 2:
        return False  # a subsystem speaks a protocol over plain pipes, as with OpenSSH
    if tty < 0 or args.no_command:
        return False
    if tty >= 2:
        return True
    if tty == 1:
        return stdin_isatty
    return args.remote_command is None and stdin_isatty and not args.stdin_null


def env_to_send(patterns: tuple[str, ...], environ: dict[str, str]) -> dict[str, str]:
    """SendEnv: local variables whose names match a pattern (*, ? wildcards); -NAME removes."""
    import fnmatch

    names: set[str] = set()
    for pat in patterns:
        if pat.startswith("-"):
            names = {n for n in names if not fnmatch.fnmatchcase(n, pat[1:])}
        else:
            names |= {n for n in environ if fnmatch.fnmatchcase(n, pat)}
    return {n: environ[n] for n in sorted(names)}


def is_ip(text: str) -> bool:
    import ipaddress  # here, not at the top: the meshssh front imports this module on every run

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def parse_budget(text: str | None) -> int:
    """--delegate-max N (or MESHSSH_DELEGATE_MAX): a positive count; there is no
    "unlimited", so that a forgotten session cannot mint without end."""
    if text is None:
        return DEFAULT_BUDGET
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--delegate-max: {text!r} is not a positive number of tokens")
    return value
