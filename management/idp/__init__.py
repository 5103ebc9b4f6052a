"""The embedded OIDC issuer, meshmgmt's default identity provider.

    issuer = setup_idp(app, store, issuer_url)      # routes + startup/cleanup hooks
    claims = await issuer.verify_access_token(tok)  # REST API auth (aud "meshmgmt")
    issuer.jwks()                                   # put into every network map
    issuer.on_keys_changed(push_maps)               # re-push maps when keys change
    await issuer.rotate_keys()                      # new signer; old key stays for the overlap
    issuer.metrics.render()                         # Prometheus text for /metrics

Grants: device code (RFC 8628) with an HTML verification page, refresh tokens (rotated,
reuse revokes the family), client credentials for service users, and token exchange
(RFC 8693) for per-peer SSH tokens. Layout: pure rules in `keys`, `tokens`, `device`,
`exchange`; storage in `keystore`, `grants`, `models`; HTTP in `http`, `page`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from .errors import IdpError
from .issuer import Issuer, IssuerSettings
from .keys import SigningKey
from .keystore import KeyStore
from .secret import SECRET_FILE, KeySecretError, load_or_create_key_secret
from .tokens import Identity

__all__ = ["ISSUER_KEY", "SECRET_FILE", "Identity", "IdpError", "Issuer", "IssuerSettings", "KeySecretError",
           "SigningKey", "ensure_signing_key", "load_or_create_key_secret", "setup_idp"]

ISSUER_KEY: web.AppKey[Issuer] = web.AppKey("meshmgmt_issuer", Issuer)

try:  # the management app's snapshot loader (fills in the DNS domain of FQDNs)
    from meshmgmt.api.keys import LOAD_STATE as _LOAD_STATE
except ImportError:  # the issuer also runs on a bare app (tests)
    _LOAD_STATE = None


def setup_idp(app: web.Application, store, issuer_url: str, settings: IssuerSettings | None = None) -> Issuer:
    """Register the issuer's routes on `app`; keys are loaded (or created) at startup.

    Call after whatever migrates the store is registered in `app.on_startup` /
    `app.cleanup_ctx`, since the issuer reads its keys from the store when the app starts.
    """
    from .http import IdpRoutes

    issuer = Issuer(store, issuer_url, settings)
    app[ISSUER_KEY] = issuer
    IdpRoutes(issuer).add_to(app)

    async def load_state():  # noqa: ANN202
        loader = app.get(_LOAD_STATE) if _LOAD_STATE is not None else None
        return await (loader() if loader is not None else store.load_state())

    issuer.load_state = load_state

    async def on_store_change(_serial: int) -> None:
        await issuer.reload_keys()  # another replica may have rotated

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await issuer.start()
        store.add_listener(on_store_change)
        task = asyncio.create_task(issuer.run_maintenance())
        yield
        store.remove_listener(on_store_change)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(lifecycle)
    return issuer


async def ensure_signing_key(store, *, secret: bytes, algorithm: str = "EdDSA") -> str:
    """Create the issuer's first signing key, sealed with `secret`, if there is none (for
    `meshmgmt init`); its kid."""
    import time

    keystore = KeyStore(store, secret=secret, overlap=IssuerSettings().key_overlap, alg=algorithm)
    ring = await keystore.ensure(time.time())
    return ring.current().kid
