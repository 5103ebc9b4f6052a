"""Admin routes for the issuer's signing keys: list them, rotate them.

`meshmgmt keys list|rotate` call these. The answer never carries private material:
only what the JWKS already publishes (kid, alg) and the key's life (created, retired,
when it stops verifying).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from ..errors import BadRequest
from . import _validate as v
from ._auth import require_admin
from .keys import EVENTS, ISSUER

routes = web.RouteTableDef()


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _issuer(request: web.Request) -> Any:
    issuer = request.app[ISSUER]
    if issuer is None:
        raise BadRequest("this server runs without the embedded issuer")
    return issuer


async def _key_list(issuer: Any) -> dict[str, Any]:
    await issuer.reload_keys()  # another replica may have rotated since our last look
    return {"signing_keys": [{**k, **{t: _iso(k[t]) for t in ("created", "retired", "withdrawn_at")}}
                     for k in issuer.key_list()]}


@routes.get("/api/signing-keys")
async def list_signing_keys(request: web.Request) -> web.Response:
    await require_admin(request)
    return web.json_response(await _key_list(_issuer(request)))


@routes.post("/api/signing-keys/rotate")
async def rotate_signing_keys(request: web.Request) -> web.Response:
    """A new signer; `drop_previous` withdraws the old keys at once (suspected leak)."""
    await require_admin(request)
    doc = await v.json_object(request)
    v.only_known(doc, {"drop_previous"})
    drop = bool(v.boolean(doc, "drop_previous", False))
    issuer = _issuer(request)
    await issuer.rotate_keys(drop_previous=drop)
    out = await _key_list(issuer)
    signer = next(k["kid"] for k in out["signing_keys"] if k["signing"])
    await request.app[EVENTS].record("issuer.keys_rotated", kid=signer, drop_previous=drop)
    return web.json_response(out)
