"""Measurement 3b/3c: `meshssh` with a JWT, and native ssh through `meshssh proxy`,
against a managed peer (`meshmgmt serve` + `meshsshd up --dataplane none` + a login).

Both rows are compared with native `ssh host true` against sshd measured in the same
run (the baseline passed in): `meshssh` latency / sshd latency ≤ 0.4, and
OpenSSH-through-proxy latency / sshd latency ≤ 1.0.
"""

from __future__ import annotations

from typing import Any

from .stats import Figure, Summary, Target

MESHSSH_ROW = "latency meshssh true (JWT)"
PROXY_ROW = "latency ssh true via meshssh proxy"


def _not_measured(sshd: Summary | None, reason: str) -> list[Figure]:
    return [
        Figure(MESHSSH_ROW, "s", "lower", sshd, None, Target("<=", 0.4), note=reason),
        Figure(PROXY_ROW, "s", "lower", sshd, None, Target("<=", 1.0), note=reason),
    ]


def measure_managed_latency(ctx: Any, sshd: Summary | None,
                            baseline: dict[str, list[float]]) -> list[Figure]:
    return _not_measured(sshd, "management, managed peer and meshssh client not available yet")
