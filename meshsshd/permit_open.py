"""Where a local forward (`ssh -L`, `ssh -D`) may connect and a remote forward (`ssh -R`)
may listen: OpenSSH's `PermitOpen` and `PermitListen`, pure.

Entries use OpenSSH's syntax: `host:port`, `[v6addr]:port`, `*` for any host or any port
(`*:443`, `db.internal:*`), or one of the words `any` (everything, the default) and
`none` (no forward may connect, or listen, anywhere). PermitListen also takes a bare
`port` (any host), and its host may carry `*` and `?` wildcards (`127.0.0.*:8080`); it
matches the host as the client asked for it, so `localhost` (what `ssh -R 8080:...`
sends) and `127.0.0.1` are different entries, as in OpenSSH. A `-R` for port 0 (let the
server choose) is allowed only by an entry with port `*`.

Unlike OpenSSH, the daemon resolves a requested name itself and checks every address it
would connect to (`may_open`), then dials exactly that address (`meshsshd/dialer.py`): an
entry names a host either by the name the client asked for or by the address it resolves
to, and a name cannot be made to resolve elsewhere between the check and the dial.

Some destinations are refused even when the list allows everything (`any`, `*:port`),
because reaching them from the peer is worth more than reaching them from the client:
link-local addresses (cloud metadata services at 169.254.169.254, fe80::/10) and the
management server's address (`protected`, filled by the managed agent). An entry that
names such a destination explicitly (not through `*`) lifts that refusal for it.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
ANY = "any"
NONE = "none"
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,252})$")
_HOST_PATTERN = re.compile(r"^[a-z0-9_.*?-]{1,253}$")   # PermitListen: no [ ] classes for fnmatch


class PermitOpenError(ValueError):
    """An entry that is not in PermitOpen syntax; the message names it."""


@dataclass(frozen=True)
class OpenTarget:
    """One entry: host is "*", a lower-case name, or an address; port None means any."""

    host: str
    port: int | None

    @property
    def address(self) -> IPAddress | None:
        try:
            return canonical_address(self.host)
        except ValueError:
            return None

    def matches(self, name: str, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host == "*":
            return True
        own = self.address
        return own == address if own is not None else self.host == normalize_name(name)

    def matches_listen(self, host: str, port: int) -> bool:
        """PermitListen: the requested host (a name or an address, as sent) and port."""
        if self.port is not None and self.port != port:
            return False
        own, host = self.address, normalize_name(host)
        if own is not None:
            try:
                return ipaddress.ip_address(host.split("%", 1)[0]) == own
            except ValueError:
                return False
        return fnmatch.fnmatchcase(host, self.host)


def normalize_name(name: str) -> str:
    return name.strip().lower().rstrip(".")


def canonical_address(text: str) -> IPAddress:
    """An address as the kernel will treat it: IPv4-mapped IPv6 is IPv4, and the
    unspecified address (a connect to 0.0.0.0 or :: reaches this host) is loopback.
    Raises ValueError for a non-address."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        addr = ipaddress.ip_address("127.0.0.1" if addr.version == 4 else "::1")
    return addr


def parse_entry(entry: str, key: str = "permit_open", *, patterns: bool = False) -> OpenTarget:
    """`host:port`, `[v6]:port`, with `*` for either half; with `patterns`, a host may
    also hold `*` and `?` wildcards (PermitListen). `key` names the list in errors."""
    text = entry.strip().lower()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise PermitOpenError(f"{key} entry {entry!r}: write an IPv6 address as [addr]:port")
        port_s = rest[1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise PermitOpenError(f"{key} entry {entry!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or ":" in host:
            raise PermitOpenError(f"{key} entry {entry!r}: expected host:port (IPv6 as [addr]:port)")
        if host != "*" and not (_HOST_PATTERN if patterns else _HOSTNAME).match(host):
            raise PermitOpenError(f"{key} entry {entry!r}: {host!r} is not a host name or address")
    if port_s == "*":
        return OpenTarget(host, None)
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise PermitOpenError(f"{key} entry {entry!r}: port must be 1-65535 or *")
    return OpenTarget(host, int(port_s))


def parse_listen_entry(entry: str) -> OpenTarget:
    """A PermitListen entry: `port` (any host), `host:port` or `[v6]:port`, wildcards allowed."""
    text = entry.strip().lower()
    return parse_entry(text if ":" in text else f"*:{text}", "permit_listen", patterns=True)


def _parse_list(entries: Iterable[str], key: str,
                parse: Callable[[str], OpenTarget]) -> tuple[OpenTarget, ...] | None:
    """The entries as targets; None means anything (no entries, or `any`).
    `none` must stand alone; () then means nothing is allowed."""
    items = [e.strip().lower() for e in entries]
    for word in (NONE, ANY):
        if word in items and len(items) > 1:
            raise PermitOpenError(f"{key}: {word!r} cannot be combined with other entries")
    if items == [NONE]:
        return ()
    if not items or items == [ANY]:
        return None
    return tuple(parse(e) for e in items)


def parse_permit_open(entries: Iterable[str]) -> tuple[OpenTarget, ...] | None:
    return _parse_list(entries, "permit_open", parse_entry)


def parse_permit_listen(entries: Iterable[str]) -> tuple[OpenTarget, ...] | None:
    return _parse_list(entries, "permit_listen", parse_listen_entry)


def is_protected(address: IPAddress, port: int, protected: Sequence[OpenTarget]) -> bool:
    """Link-local, or one of the management server's addresses."""
    if any(address.version == net.version and address in net for net in LINK_LOCAL):
        return True
    return any(t.matches("", address, port) for t in protected)


@dataclass(frozen=True)
class OpenDecision:
    allowed: bool
    reason: str = ""   # short, safe for the client and the log


def may_open(permit_open: Sequence[str], name: str, address: str, port: int, *,
             protected: Sequence[str] = ()) -> OpenDecision:
    """May a local forward requested as `name`:`port` connect to `address`?

    `permit_open` and `protected` are validated entry lists (`Settings` checks them)."""
    targets = parse_permit_open(permit_open)
    try:
        addr = canonical_address(address)
    except ValueError:
        return OpenDecision(False, f"{address!r} is not an address")
    if targets == ():
        return OpenDecision(False, "local forwards may not connect anywhere on this peer (permit_open none)")
    fences = [parse_entry(e) for e in protected]
    explicit = any(t.host != "*" and t.matches(name, addr, port) for t in targets or ())
    if is_protected(addr, port, fences) and not explicit:
        return OpenDecision(False, f"{addr} port {port} is link-local or the management server; "
                                   "only an explicit permit_open entry allows it")
    if targets is None or any(t.matches(name, addr, port) for t in targets):
        return OpenDecision(True)
    return OpenDecision(False, f"{name} port {port} is not in this peer's permit_open list")


def may_listen_on(permit_listen: Sequence[str], host: str, port: int) -> OpenDecision:
    """May a remote forward listen on `host`:`port` as requested (port 0: any free one)?

    `permit_listen` is a validated entry list. This only narrows: which addresses a `-R`
    may bind at all is `forwarding.may_listen`'s (loopback and the peer's own)."""
    targets = parse_permit_listen(permit_listen)
    if targets is None:
        return OpenDecision(True)
    if targets == ():
        return OpenDecision(False, "remote forwards may not listen anywhere on this peer (permit_listen none)")
    if any(t.matches_listen(host, port) for t in targets):
        return OpenDecision(True)
    return OpenDecision(False, f"{host or '*'} port {port} is not in this peer's permit_listen list")


def validate_entries(entries: Iterable[str], key: str,
                     parse: Callable[[Iterable[str]], object] = parse_permit_open) -> tuple[str, ...]:
    """The entries as given, once they parse (`parse_permit_open` or
    `parse_permit_listen`); raises PermitOpenError naming `key`."""
    items = tuple(entries)
    try:
        parse(items)
    except PermitOpenError as exc:
        raise PermitOpenError(f"{key}: {exc}") from None
    return items
