"""Who the client is: the TCP peer, or, behind a trusted reverse proxy, the address that
proxy saw (`X-Forwarded-For`).

Every rate limit and every `ip=` in the logs keys on this address. Behind a proxy the TCP
peer is the proxy for everyone, so without this all clients would share one bucket (one
noisy client locks out all). But the header is whatever the client wrote, except for
what trusted proxies appended, so it is read only when the TCP peer is a trusted proxy
(`--trusted-proxy CIDR`), and then from the right: each trusted hop appends the address
it received from, so the right-most address that is not itself a trusted proxy is the
first one nobody we trust could have forged. The left-most entry is the client's own
claim and is never used. Without trusted proxies the header is ignored.

`forwarded_middleware` puts the result into `request.remote` (aiohttp's
`request.clone(remote=…)`), so handlers keep reading `request.remote`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Sequence

from aiohttp import web

from .errors import BadRequest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def parse_trusted_proxies(specs: Iterable[str]) -> tuple[Network, ...]:
    """`--trusted-proxy` values as networks (an address alone is its /32 or /128).
    Refused: malformed values, host bits set, and `/0`: trusting every address would
    let any client name its own address and escape every limit."""
    out: list[Network] = []
    for spec in specs:
        try:
            net = ipaddress.ip_network(spec.strip(), strict=True)
        except ValueError as exc:
            raise BadRequest(f"--trusted-proxy {spec!r} is not an address or CIDR network: {exc}",
                             field="trusted_proxy") from exc
        if net.prefixlen == 0:
            raise BadRequest(f"--trusted-proxy {spec!r} trusts every address, so any client could choose "
                             "its own; name the proxies' addresses", field="trusted_proxy")
        out.append(net)
    return tuple(out)


def _address(text: str) -> Address | None:
    """One X-Forwarded-For entry, as proxies write them (`1.2.3.4`, `2001:db8::1`,
    also `[2001:db8::1]` and `1.2.3.4:5678`); None when it is not an address."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(addr, "ipv4_mapped", None)
    return mapped or addr


def _trusted(addr: Address, proxies: Sequence[Network]) -> bool:
    return any(addr.version == net.version and addr in net for net in proxies)


def client_address(remote: str | None, forwarded_for: Sequence[str], proxies: Sequence[Network]) -> str:
    """The client's address: `remote` unless it is a trusted proxy; then walk the
    `X-Forwarded-For` entries (all headers, in order) from the right past trusted
    proxies. An entry that is no address stops the walk at the last hop that is known."""
    peer = _address(remote or "")
    if peer is None:
        return remote or "?"
    if not proxies or not _trusted(peer, proxies):
        return str(peer)
    hops = [entry for header in forwarded_for for entry in header.split(",")]
    current = peer
    for entry in reversed(hops):
        addr = _address(entry)
        if addr is None:
            break
        current = addr
        if not _trusted(addr, proxies):
            break
    return str(current)


def forwarded_middleware(proxies: Sequence[Network]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """A middleware giving handlers the real client in `request.remote`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        real = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), proxies)
        if real != request.remote:
            request = request.clone(remote=real)
        return await handler(request)

    return middleware


__all__ = ["client_address", "forwarded_middleware", "parse_trusted_proxies"]
