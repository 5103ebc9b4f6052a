"""Counters of the issuer: token grants by type, refusals by grant type and reason.

Plain in-process counters with a Prometheus text rendering, so the management `/metrics`
page can append `issuer.metrics.render()` whatever it uses for its own metrics.
"""

from __future__ import annotations

from collections import Counter


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class IdpMetrics:
    def __init__(self) -> None:
        self.grants: Counter[str] = Counter()  # grant type → tokens issued
        self.refusals: Counter[tuple[str, str]] = Counter()  # (grant type, reason) → count
        self.key_rotations = 0

    def granted(self, grant: str, count: int = 1) -> None:
        self.grants[grant] += count

    def refused(self, grant: str, reason: str) -> None:
        self.refusals[(grant, reason)] += 1

    def render(self) -> str:
        lines = [
            "# HELP meshmgmt_token_grants_total Tokens issued by the embedded issuer, by grant type.",
            "# TYPE meshmgmt_token_grants_total counter",
        ]
        for grant, n in sorted(self.grants.items()):
            lines.append(f'meshmgmt_token_grants_total{{grant="{_escape(grant)}"}} {n}')
        lines += [
            "# HELP meshmgmt_token_refusals_total Token requests refused, by grant type and reason.",
            "# TYPE meshmgmt_token_refusals_total counter",
        ]
        for (grant, reason), n in sorted(self.refusals.items()):
            lines.append(
                f'meshmgmt_token_refusals_total{{grant="{_escape(grant)}",reason="{_escape(reason)}"}} {n}'
            )
        lines += [
            "# HELP meshmgmt_signing_key_rotations_total Signing-key rotations done by this replica.",
            "# TYPE meshmgmt_signing_key_rotations_total counter",
            f"meshmgmt_signing_key_rotations_total {self.key_rotations}",
        ]
        return "\n".join(lines) + "\n"
