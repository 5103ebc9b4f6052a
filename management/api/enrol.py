"""Proof of the WireGuard key at registration, and who may re-register an existing key.

    POST /api/peers/challenge {wg_public_key}  → {challenge, management_key, expires_in, version}
    POST /api/peers/register  {..., challenge, proof}            (peers.py; checks here)

A WireGuard public key is published in every network map, so it proves nothing by itself:
the registering peer answers a single-use, short-lived challenge with an AEAD box only the
holder of the private key can make (`meshsshd/peerproof.py`). Challenges live in the store
(`peer_challenges`) so any replica can check the answer; answering deletes the row, so a
replayed answer is refused. A key that is already registered additionally needs the
peer's current credential or an admin's approval (`meshmgmt peers approve-rekey`): the
proof shows the caller has the key, not that the key was not stolen with the machine's
old state, and a stale state directory must not silently take over a live peer.
"""

from __future__ import annotations

import base64
import hmac
import os
from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import delete

from meshsshd.peerproof import CHALLENGE_BYTES, REGISTRATION_VERSION, ProofError, public_key_b64, verify

from ..errors import BadRequest, Conflict, NotFound, TooManyRequests, Unauthorized
from ..store import Peer, PeerChallenge, aware, hash_secret, utcnow
from . import _validate as v
from ._auth import peer_header, require_admin
from ._lookup import by_id_or_name
from .keys import BOX_KEY, CHALLENGE_LIMITER, EVENTS, STORE

routes = web.RouteTableDef()

CHALLENGE_TTL = timedelta(seconds=60)


@routes.post("/api/peers/challenge")
async def challenge(request: web.Request) -> web.Response:
    decision = request.app[CHALLENGE_LIMITER].hit(request.remote or "?")
    if not decision.allowed:
        raise TooManyRequests("too many registration challenges from this address; slow down",
                              decision.retry_after)
    doc = await v.json_object(request)
    v.only_known(doc, {"wg_public_key"})
    wg = v.string(doc, "wg_public_key", v.WG_KEY, required=True) or ""
    nonce = base64.b64encode(os.urandom(CHALLENGE_BYTES)).decode()
    box_key = public_key_b64(request.app[BOX_KEY])
    now = utcnow()
    async with request.app[STORE].write() as s:
        await s.execute(delete(PeerChallenge).where(PeerChallenge.expires_at < now))
        s.add(PeerChallenge(id=hash_secret(nonce), wg_public_key=wg, box_key=box_key,
                            expires_at=now + CHALLENGE_TTL))
    return web.json_response({"challenge": nonce, "management_key": box_key, "version": REGISTRATION_VERSION,
                              "expires_in": int(CHALLENGE_TTL.total_seconds())})


async def consume_proof(request: web.Request, s: Any, doc: dict[str, Any], wg: str) -> None:
    """Check the registration's proof and use up its challenge, inside the registration's
    transaction (a failed registration leaves the challenge for a retry until it expires)."""
    nonce = v.string(doc, "challenge", v.CHALLENGE)
    proof = v.string(doc, "proof", v.PROOF)
    if not nonce or not proof:
        raise BadRequest("registration needs a 'challenge' (POST /api/peers/challenge) and a 'proof' "
                         "made with the WireGuard private key; this meshsshd is too old for this "
                         "management server", field="proof", code="proof_required")
    row = await s.get(PeerChallenge, hash_secret(nonce))
    expires = aware(row.expires_at) if row is not None else None
    if row is None or row.wg_public_key != wg or expires is None or expires <= utcnow():
        raise Unauthorized("the challenge is unknown, expired, already used or was asked for another "
                           "WireGuard key; ask for a new one", field="challenge", code="invalid_challenge")
    box = request.app[BOX_KEY]
    if row.box_key != public_key_b64(box):
        raise Unauthorized("the challenge was issued by a management replica with another peer-box.key; "
                           "every replica needs the same file", field="challenge", code="box_key_mismatch")
    try:
        verify(box, wg, nonce, doc, proof)
    except ProofError as exc:
        raise Unauthorized(str(exc), field="proof", code="invalid_proof") from None
    used = await s.execute(delete(PeerChallenge).where(PeerChallenge.id == row.id))
    if used.rowcount != 1:  # another request answered it first
        raise Unauthorized("the challenge was already used; ask for a new one", field="challenge",
                           code="invalid_challenge")


def authorise_rekey(request: web.Request, peer: Peer) -> str:
    """How the caller may re-register `peer`'s key ("credential" or "approval"), or 409.

    An approval is single-use: it is spent by this registration."""
    claimed = peer_header(request)
    if claimed is not None and claimed[0] == peer.id and hmac.compare_digest(
            peer.credential_hash, hash_secret(claimed[1])):
        return "credential"
    approved = aware(peer.rekey_approved_until)
    if approved is not None and approved > utcnow():
        peer.rekey_approved_until = None
        return "approval"
    raise Conflict(f"a peer with this WireGuard key is already registered as {peer.name}; it keeps its "
                   "identity. To register it again (its state was lost), an admin runs "
                   f"`meshmgmt peers approve-rekey {peer.name}` or deletes the peer",
                   field="wg_public_key", code="peer_exists")


@routes.post("/api/peers/{id}/approve-rekey")
async def approve_rekey(request: web.Request) -> web.Response:
    """Let the peer's WireGuard key register once more without its current credential
    (its state directory was lost, the key kept) within `expires_in` seconds. The
    registration must still prove the key; the peer keeps its id, name, address, groups."""
    await require_admin(request)
    doc = await v.json_object(request) if request.can_read_body else {}
    v.only_known(doc, {"expires_in"})
    expires_in = v.integer(doc, "expires_in", v.REKEY_FOR, 3600) or 3600
    ref = request.match_info["id"]
    until = utcnow() + timedelta(seconds=expires_in)
    async with request.app[STORE].write() as s:
        peer = await by_id_or_name(s, Peer, ref) if len(ref) <= 64 and "\x00" not in ref else None
        if peer is None:
            raise NotFound("no such peer")
        peer.rekey_approved_until = until
        out = {"id": peer.id, "name": peer.name,
               "rekey_approved_until": until.isoformat().replace("+00:00", "Z")}
    await request.app[EVENTS].record("peer.rekey_approved", peer_id=out["id"], name=out["name"],
                                     until=out["rekey_approved_until"])
    return web.json_response(out)


__all__ = ["CHALLENGE_TTL", "approve_rekey", "authorise_rekey", "consume_proof", "routes"]
