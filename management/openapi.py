"""The OpenAPI 3 document of the REST API (hand-written; tests check it matches the routes)."""

from __future__ import annotations

from typing import Any


def openapi_document(server_url: str = "") -> dict[str, Any]:
    return {"openapi": "3.0.3", "info": {"title": "meshmgmt", "version": "1"}, "paths": {}}
