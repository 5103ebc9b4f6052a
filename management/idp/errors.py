"""Errors of the embedded OIDC issuer.

    IdpError            an OAuth request was refused. `error` is the RFC 6749/8628/8693
                        code put on the wire, `description` a one-line human reason that
                        is safe to show the caller, `reason` a short stable code for
                        logs, metrics and tests, `status` the HTTP status.

Token and password material never appears in any of these fields.
"""

from __future__ import annotations


class IdpError(Exception):
    def __init__(self, error: str, description: str, *, status: int = 400, reason: str | None = None) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.reason = reason or error

    def to_oauth(self) -> dict[str, str]:
        """RFC 6749 §5.2 error body."""
        return {"error": self.error, "error_description": self.description}
