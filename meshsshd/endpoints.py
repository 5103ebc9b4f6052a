"""This host's WireGuard endpoints, told to management at registration when none were
given: its global IPv4 addresses (not the mesh interface) with the WireGuard port."""

from __future__ import annotations


async def local_endpoints(interface: str, port: int) -> tuple[str, ...]:
    """This host's global IPv4 addresses (not the mesh interface) with the WireGuard port."""
    from .dataplane._exec import run

    res = await run(["ip", "-o", "-4", "address", "show", "scope", "global"], check=False)
    return endpoints_from_ip_output(res.stdout, interface, port)


def endpoints_from_ip_output(text: str, interface: str, port: int) -> tuple[str, ...]:
    """`ip -o -4 address show` lines → ("192.0.2.5:51820", ...), skipping the mesh interface."""
    out = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[1] != interface and cols[2] == "inet":
            out.append(f"{cols[3].split('/')[0]}:{port}")
    return tuple(out)
