"""Headers every answer carries, and the optional bearer token in front of `/metrics`.

JSON answers hold credentials and audit data: `Cache-Control: no-store` keeps them out of
proxy and browser caches, and `X-Content-Type-Options: nosniff` stops a browser from
reading one as HTML. The `Server` header names the product only; versions help nobody
but someone picking an exploit.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from aiohttp import web

from .errors import BadRequest, Unauthorized

SERVER_NAME = "meshmgmt"


async def harden_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: runs for handlers, errors and WebSocket upgrades alike."""
    response.headers["Server"] = SERVER_NAME
    response.headers["X-Content-Type-Options"] = "nosniff"
    if (response.content_type or "").endswith("json"):
        response.headers["Cache-Control"] = "no-store"


def read_metrics_token(path: Path | None) -> str | None:
    """The token `--metrics-token-file` names (first line), or None when no file is set.
    Refused at start when the file is missing or empty: an operator who asked for a token
    must not get an open `/metrics` by a typo."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise BadRequest(f"--metrics-token-file {path}: {exc.strerror}", field="metrics_token_file") from None
    if not token:
        raise BadRequest(f"--metrics-token-file {path} is empty", field="metrics_token_file")
    return token


def check_metrics_token(request: web.Request, token: str | None) -> None:
    """401 unless `Authorization: Bearer <token>` matches (when a token is configured)."""
    if token is None:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("GET /metrics needs 'Authorization: Bearer <token from --metrics-token-file>'",
                           code="metrics_unauthorized")
