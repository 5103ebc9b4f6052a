"""The caller's own account: `POST /api/me/password`, a user changing their password.

The current password is proven first, through the issuer's sign-in throttle (the same
per (email, client) backoff as the verification page, `management/idp/signin.py`), so an
access token is no faster a password oracle than the page. The new password meets the
rules of user creation (`store.passwords`). The write is a compare-and-set on the hash
that was verified, and it revokes every login of the user, the caller's own included,
in the same transaction: whoever held the old password holds nothing after it.
"""

from __future__ import annotations

import logging

from aiohttp import web
from sqlalchemy import update

from meshsshd.logs import event

from ..errors import Conflict, Forbidden, TooManyRequests, Unauthorized, Unprocessable
from ..idp.grants import revoke_user_families
from ..store import User
from ..store.passwords import hash_password_async, verify_password_async
from . import _validate as v
from ._auth import require_user
from .keys import EVENTS, ISSUER, STORE

log = logging.getLogger("meshmgmt.api.account")
routes = web.RouteTableDef()


async def _verified_hash(request: web.Request, user_id: str, email: str, current: str) -> str:
    """The stored hash `current` matches, within the sign-in throttle; a refusal otherwise."""
    throttle = request.app[ISSUER].sign_in
    client = request.remote or "?"
    decision = throttle.begin(email, client)
    if not decision.allowed:
        raise TooManyRequests(f"too many wrong passwords; try again in {decision.retry_after_header} s",
                              decision.retry_after)
    try:
        async with request.app[STORE].session() as s:
            user = await s.get(User, user_id)
        if user is None:
            raise Unauthorized("the token's user does not exist")
        if user.is_service or user.password_hash is None:
            raise Unprocessable("this account has no password here; an administrator can set one "
                                "(`meshmgmt users set-password EMAIL`)", field="current_password")
        if not await verify_password_async(user.password_hash, current):
            wait = throttle.failed(email, client)
            raise Forbidden(f"the current password is wrong; nothing was changed (next try in "
                            f"{wait.retry_after_header} s)", code="wrong_password", field="current_password")
        throttle.succeeded(email, client)
        return user.password_hash
    finally:
        throttle.release(email, client)


@routes.post("/api/me/password")
async def change_password(request: web.Request) -> web.Response:
    caller = await require_user(request)
    assert caller.user_id is not None and caller.email is not None
    doc = await v.json_object(request)
    v.only_known(doc, {"current_password", "new_password"})
    current = v.string(doc, "current_password", v.CURRENT_PASSWORD, required=True) or ""
    new = v.string(doc, "new_password", v.PASSWORD, required=True) or ""
    old_hash = await _verified_hash(request, caller.user_id, caller.email, current)
    new_hash = await hash_password_async(new)
    async with request.app[STORE].write() as s:
        done = await s.execute(update(User).where(User.id == caller.user_id, User.password_hash == old_hash)
                               .values(password_hash=new_hash))
        if done.rowcount != 1:  # raising rolls the write back
            raise Conflict("the password was changed meanwhile; nothing was changed, try again")
        logins = await revoke_user_families(s, caller.user_id, "password-changed")
    event(log, "user.password_changed", user=caller.user_id, logins=logins)
    await request.app[EVENTS].record("user.password_changed", user_id=caller.user_id, email=caller.email,
                                     actor=caller.email, logins_signed_out=logins)
    return web.json_response({"logins_signed_out": logins})
