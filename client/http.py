"""A tiny JSON-over-HTTP helper on the standard library.

Why not aiohttp: `meshssh proxy` and `detect` start for every `ssh` invocation, and
urllib imports in ~20 ms against aiohttp's ~150 ms. Calls are blocking; async callers
run them through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import ManagementError

TIMEOUT = 15.0


def _request(req: urllib.request.Request, timeout: float) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        body = exc.read()
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManagementError(f"cannot reach management at {req.full_url}: {reason}") from exc
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        doc = {"error": "bad_response", "message": body[:200].decode(errors="replace")}
    return status, doc


def check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ManagementError(f"{url!r} is not an http(s) URL")
    return url.rstrip("/")


def get_json(url: str, bearer: str | None = None, timeout: float = TIMEOUT) -> tuple[int, Any]:
    headers = {"Accept": "application/json"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    return _request(urllib.request.Request(url, headers=headers), timeout)


def post_json(url: str, doc: Any, bearer: str, timeout: float = TIMEOUT) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(doc).encode(), method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json",
                 "Authorization": f"Bearer {bearer}"},
    )
    return _request(req, timeout)


def post_form(url: str, fields: list[tuple[str, str]], timeout: float = TIMEOUT) -> tuple[int, Any]:
    data = urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(
        url, data=data, method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
    )
    return _request(req, timeout)


def error_text(doc: Any, fallback: str) -> tuple[str, str]:
    """(code, human message) from an OAuth or REST error document."""
    if not isinstance(doc, dict):
        return "", fallback
    code = str(doc.get("error", "") or "")
    msg = doc.get("error_description") or doc.get("message") or code or fallback
    return code, str(msg)
