"""The daemon's nftables table: inbound default-deny on the mesh interface, port 22 → 22022.

One table (`inet meshsshd`, or `inet meshsshd_<if>` for a non-default interface) is
owned by the daemon and nothing else. Each map is applied as ONE `nft -f` script that
creates the table if missing, deletes it and defines it again: nft runs a script as a
single transaction, so packets see either the old rules or the new ones, and a stale
table left by a crash is replaced by the first apply.

    chain input      (filter, input)  iifname <if> → jump mesh_in; other interfaces untouched
    chain mesh_in    established/related accept; invalid drop; one accept per map rule; drop
    chain prerouting (nat, dstnat)    iifname <if> ip daddr <own mesh IP> tcp dport 22
                                      → dnat to <own mesh IP>:22022 (only while SSH serves)

DNAT happens before the input hook, so a rule that opens tcp/22 also opens 22022 (the port
the redirected packets carry by then). `render_ruleset` is pure; `NftTable` runs it.
"""

from __future__ import annotations

import ipaddress
import re

from ..netmap import REDIRECTED_SSH_PORT, SSH_PORT, FirewallRule, NetworkMap, parse_port_range
from ._exec import run

DEFAULT_TABLE = "meshsshd"
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def table_name(interface: str) -> str:
    """`meshsshd` for the default interface, `meshsshd_<if>` otherwise (one per daemon)."""
    if interface == "mesh0":
        return DEFAULT_TABLE
    return DEFAULT_TABLE + "_" + re.sub(r"[^A-Za-z0-9_]", "_", interface)


def check_interface_name(name: str) -> str:
    if not _IFNAME.match(name):
        raise ValueError(f"interface name {name!r} must be 1-15 letters, digits, '_', '.' or '-'")
    return name


def _port_set(rule: FirewallRule, serve_ssh_redirect: bool) -> str | None:
    """"{ 22, 22022, 8000-8080 }" or None for every port."""
    if not rule.ports:
        return None
    parts: list[str] = []
    for spec in rule.ports:
        lo, hi = parse_port_range(spec)
        parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
        if rule.protocol == "tcp" and serve_ssh_redirect and lo <= REDIRECTED_SSH_PORT <= hi and not (
            lo <= SSH_PORT <= hi
        ):
            parts.append(str(SSH_PORT))
    return "{ " + ", ".join(dict.fromkeys(parts)) + " }"


def _rule_lines(rule: FirewallRule, serve_ssh_redirect: bool) -> list[str]:
    """One accept line per address family the rule's sources use."""
    v4: list[str] = []
    v6: list[str] = []
    for src in rule.sources:
        net = ipaddress.ip_network(src, strict=False)
        (v4 if net.version == 4 else v6).append(str(net))
    families: list[tuple[str, list[str]]] = []
    if not rule.sources:
        families.append(("", []))
    if v4:
        families.append(("ip", v4))
    if v6:
        families.append(("ip6", v6))

    if rule.protocol in ("tcp", "udp"):
        ports = _port_set(rule, serve_ssh_redirect)
        proto = f"{rule.protocol} dport {ports}" if ports else f"meta l4proto {rule.protocol}"
    elif rule.protocol == "icmp":
        proto = "meta l4proto { icmp, ipv6-icmp }"
    else:  # all
        proto = ""

    lines = []
    for family, nets in families:
        src = f"{family} saddr {{ {', '.join(nets)} }}" if family else ""
        lines.append(" ".join(p for p in (src, proto, "accept") if p))
    return lines


def render_ruleset(table: str, interface: str, netmap: NetworkMap | None, serve_ssh: bool) -> str:
    """The whole `nft -f` script for one map (pure: same inputs, same text)."""
    check_interface_name(interface)
    iif = f'iifname "{interface}"'
    rules: list[str] = []
    if netmap is not None:
        for rule in netmap.firewall_rules:
            rules.extend(_rule_lines(rule, serve_ssh))
    out = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f"    {iif} jump mesh_in",
        "  }",
        "  chain mesh_in {",
        "    ct state established,related accept",
        "    ct state invalid drop",
        *(f"    {line}" for line in rules),
        "    drop",
        "  }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    if serve_ssh and netmap is not None:
        ip = ipaddress.ip_address(netmap.peer.mesh_ip)
        fam = "ip" if ip.version == 4 else "ip6"
        target = f"{ip}:{SSH_PORT}" if ip.version == 4 else f"[{ip}]:{SSH_PORT}"
        out.append(
            f"    {iif} {fam} daddr {ip} tcp dport {REDIRECTED_SSH_PORT} dnat {fam} to {target}"
        )
    out += ["  }", "}"]
    return "\n".join(out) + "\n"


def render_delete(table: str) -> str:
    """Delete the table whether or not it exists (create-then-delete in one transaction)."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


class NftTable:
    """Applies rendered scripts; remembers the last one so an identical map costs nothing."""

    def __init__(self, interface: str, nft: str = "nft") -> None:
        self.interface = check_interface_name(interface)
        self.table = table_name(interface)
        self.nft = nft
        self._applied: str | None = None

    async def apply(self, netmap: NetworkMap | None, serve_ssh: bool) -> bool:
        """Install the rules for this map; False when nothing changed."""
        script = render_ruleset(self.table, self.interface, netmap, serve_ssh)
        if script == self._applied:
            return False
        await run([self.nft, "-f", "-"], stdin=script)
        self._applied = script
        return True

    async def remove(self) -> None:
        await run([self.nft, "-f", "-"], stdin=render_delete(self.table))
        self._applied = None

    async def exists(self) -> bool:
        res = await run([self.nft, "list", "table", "inet", self.table], check=False)
        return res.returncode == 0
