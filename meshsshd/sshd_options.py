"""Small sshd options operators reach for, parsed once for the config loader: `banner`
(sshd's Banner: text shown before authentication), `force_command` (ForceCommand) and
`rekey_limit` (RekeyLimit "data [time]")."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError

BANNER_MAX = 8 * 1024
_SIZE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_TIME = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# asyncssh's own defaults, which `rekey_limit = "default none"` keeps (as sshd's
# RekeyLimit default is the cipher's own limit and no time).
DEFAULT_REKEY_BYTES = 1 << 30
DEFAULT_REKEY_SECONDS = 3600


def printable(text: str) -> str:
    """What reaches the user's terminal: text, newlines and tabs; other control
    characters (escape sequences that could rewrite the screen) as \\xNN."""
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)


def read_banner(path: str) -> str:
    """The banner file's text, bounded and made printable; a clear error otherwise.
    `path` is absolute (the config schema's `AbsolutePath`)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(BANNER_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"banner {path}: {exc.strerror}") from None
    if len(data) > BANNER_MAX:
        raise ConfigError(f"banner {path} is over {BANNER_MAX} bytes")
    text = printable(data.decode("utf-8", errors="replace").replace("\r\n", "\n"))
    return text if text.endswith("\n") or not text else text + "\n"


def parse_rekey_limit(text: str) -> tuple[int, int]:
    """"1G 1h", "512M", "default 30m", "1G none" → (bytes, seconds); 0 seconds: no time limit."""
    words = text.split()
    if not 1 <= len(words) <= 2:
        raise ConfigError(f"rekey_limit {text!r}: expected \"DATA [TIME]\" such as \"1G 1h\"")
    data = DEFAULT_REKEY_BYTES
    if words[0] != "default":
        m = re.fullmatch(r"(\d+)([KMG]?)", words[0])
        if not m or not 16 <= int(m[1]) * _SIZE[m[2]] <= 1 << 40:
            raise ConfigError(f"rekey_limit data {words[0]!r}: a size from 16 to 1T such as 512M or 1G")
        data = int(m[1]) * _SIZE[m[2]]
    seconds = DEFAULT_REKEY_SECONDS
    if len(words) == 2 and words[1] != "default":
        if words[1] == "none":
            seconds = 0
        else:
            m = re.fullmatch(r"(\d+)([smhdw]?)", words[1])
            if not m or int(m[1]) == 0:
                raise ConfigError(f"rekey_limit time {words[1]!r}: a duration such as 30m or 1h, or none")
            seconds = int(m[1]) * _TIME[m[2]]
    return data, seconds
