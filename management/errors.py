"""Exceptions of the management server.

    ManagementError              base; `status` (HTTP), `code` (stable), `field` (optional)
    ├── BadRequest        400    a body/query field is missing or malformed
    ├── Unauthorized      401    no or wrong credentials
    ├── Forbidden         403    authenticated, but not allowed
    ├── NotFound          404
    ├── RequestTimeout    408    the body did not arrive in time (a slow client)
    ├── Conflict          409    unique name taken, object in use
    ├── Unprocessable     422    well-formed, but names a row that does not exist or
    │                            combines fields that exclude each other (no schema says so)
    └── TooManyRequests   429    rate limited; `retry_after` seconds

The API's error middleware turns each into `{"error", "message", "field"?}` JSON
(docs/protocol.md); the CLI turns them into a one-line message and exit code 1.
"""

from __future__ import annotations


class ManagementError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        doc = {"error": self.code, "message": self.message}
        if self.field:
            doc["field"] = self.field
        return doc


class BadRequest(ManagementError):
    status = 400
    code = "invalid_request"


class Unprocessable(ManagementError):
    # Its own status, not 400: the OpenAPI document can state every 400 cause as a schema
    # constraint, so a schema-valid body is never a 400 (schemathesis checks exactly that).
    status = 422
    code = "unprocessable"


class Unauthorized(ManagementError):
    status = 401
    code = "unauthorized"


class Forbidden(ManagementError):
    status = 403
    code = "forbidden"


class NotFound(ManagementError):
    status = 404
    code = "not_found"


class RequestTimeout(ManagementError):
    status = 408
    code = "request_timeout"


class Conflict(ManagementError):
    status = 409
    code = "conflict"


class TooManyRequests(ManagementError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
