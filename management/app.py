"""The aiohttp application factory: `create_app(settings, store=None) -> web.Application`.

Wiring, in order: the store (migrated at startup, LISTENing on PostgreSQL), the audit
feed, the sync hub (recomputes maps on every store change), the embedded issuer
(`meshmgmt.idp.setup_idp`; its JWKS goes into every map and its access tokens
authenticate admins and users), then the REST routes, /metrics, /healthz and the
OpenAPI document. Every error leaves as JSON (`{"error", "message", "field"?}`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from meshsshd.logs import event
from meshsshd.metrics import PROMETHEUS_CONTENT_TYPE

from .api import account, audit, enrol, groups, peer_admin, peers, policies, setup_keys, signing_keys, subsystems, users
from .api.keys import (AUDIT_LIMITER, BOX_KEY, CHALLENGE_LIMITER, EVENTS, HUB, ISSUER, LOAD_STATE, METRICS, METRICS_TOKEN,
                       REGISTER_LIMITER, SETTINGS, STORE)
from .boxkey import load_or_create_box_key
from .clientaddr import forwarded_middleware, parse_trusted_proxies
from .errors import ManagementError, TooManyRequests
from .events import EventFeed, prune_events
from .http_headers import check_metrics_token, harden_headers, read_metrics_token
from .metrics import Registry
from .openapi import openapi_document
from .ratelimit import RateLimiter
from .settings import MgmtSettings
from .state import MeshState
from .store import Store
from .store.failures import store_failure
from .sync import SyncHub

log = logging.getLogger("meshmgmt.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(status: int, code: str, message: str, field: str | None = None,
                headers: dict[str, str] | None = None) -> web.Response:
    doc = {"error": code, "message": message}
    if field:
        doc["field"] = field
    return web.json_response(doc, status=status, headers=headers)


_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


def _allow(request: web.Request) -> dict[str, str] | None:
    """`Allow` for a fixed path: aiohttp merges in the methods of a `{id}` route the path
    also matches (`/api/peers/challenge` would offer `/api/peers/{id}`'s DELETE), which
    is wrong: a fixed path wins over a pattern (the routes are ordered for that)."""
    for resource in request.app.router.resources():
        if resource.canonical == request.path and "{" not in resource.canonical:
            return {"Allow": ",".join(sorted({route.method for route in resource}))}
    return None


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ManagementError as exc:
        headers = {"Retry-After": str(max(1, int(exc.retry_after + 0.999)))} if isinstance(exc, TooManyRequests) else None
        if exc.status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        return web.json_response(exc.to_dict(), status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        if exc.status == 405:
            headers.update(_allow(request) or {})
        return _json_error(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason, headers=headers)
    except IntegrityError:
        # Handlers turn the unique constraints they expect into 409 themselves; this is the
        # net for a race between two writers (e.g. two replicas creating the same name).
        return _json_error(409, "conflict", "that conflicts with an existing object; reload and retry")
    except DataError as exc:
        log.warning("store refused a value in %s %s: %s", request.method, request.path, type(exc.orig).__name__)
        return _json_error(400, "invalid_request", "a value was refused by the store (too long or malformed)")
    except DBAPIError as exc:
        failure = store_failure(exc)
        if failure is None:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _json_error(500, "internal", "internal error; see the server log")
        # The store logged the cause once (Store._watched); the transaction rolled back.
        return _json_error(503, "store_full" if failure.disk_full else "store_unavailable",
                           f"the store cannot take writes ({failure.reason}); nothing was changed",
                           headers={"Retry-After": "30"})
    except ConnectionResetError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _json_error(500, "internal", "internal error; see the server log")


async def healthz(request: web.Request) -> web.Response:
    store = request.app[STORE]
    try:
        serial = await store.serial()
        full = await store.disk_full()
        if full is not None:
            return _json_error(503, "store_unhealthy", f"the store does not take writes: {full}")
        if store.write_failure is not None:
            await store.probe_write()  # clears write_failure when the store takes writes again
    except DBAPIError as exc:
        failure = store_failure(exc)
        reason = failure.reason if failure else type(exc).__name__
        return _json_error(503, "store_unhealthy", f"the store does not take writes: {reason}")
    except Exception as exc:
        return _json_error(503, "store_unavailable", f"the store does not answer: {type(exc).__name__}")
    return web.json_response({"status": "ok", "serial": serial})


async def metrics(request: web.Request) -> web.Response:
    check_metrics_token(request, request.app[METRICS_TOKEN])
    return web.Response(text=request.app[METRICS].render(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[SETTINGS].public_url))


def _setup_issuer(app: web.Application, store: Store, settings: MgmtSettings):  # noqa: ANN202
    try:
        from .idp import SECRET_FILE, IssuerSettings, setup_idp
    except ImportError as exc:  # only while the issuer package is incomplete
        event(log, "idp.unavailable", level=logging.WARNING, error=str(exc))
        return None
    options = {"key_secret_file": settings.data_dir / SECRET_FILE,
               "refresh_family_ttl": settings.refresh_token_lifetime, **(settings.idp_options or {})}
    return setup_idp(app, store, settings.public_url, IssuerSettings(**options))


def create_app(settings: MgmtSettings, store: Store | None = None) -> web.Application:
    store = store or Store.for_data_dir(settings.data_dir, settings.database)
    app = web.Application(middlewares=[errors_middleware,
                                       forwarded_middleware(parse_trusted_proxies(settings.trusted_proxies))],
                          client_max_size=2 * 1024 * 1024)
    registry = Registry()
    app[SETTINGS] = settings
    app[STORE] = store
    app[METRICS] = registry
    app[EVENTS] = EventFeed(store)
    app[REGISTER_LIMITER] = RateLimiter(settings.register_rate, settings.register_burst)
    app[CHALLENGE_LIMITER] = RateLimiter(settings.register_rate, settings.register_burst)
    app[AUDIT_LIMITER] = RateLimiter(settings.audit_rate, settings.audit_burst)
    registry.counter(peers.DROPPED, peers.DROPPED_HELP)  # listed from the start, before any drop
    app[BOX_KEY] = load_or_create_box_key(settings.data_dir)
    app[METRICS_TOKEN] = read_metrics_token(settings.metrics_token_file)
    app.on_response_prepare.append(harden_headers)

    async def load_state() -> MeshState:
        state = await store.load_state(network=settings.network, dns_domain=settings.dns_domain)
        issuer = app[ISSUER]
        if issuer is not None:
            state = dataclasses.replace(state, issuer=issuer.issuer_url, jwks=issuer.jwks())
        if settings.ssh_permit_open:
            state = dataclasses.replace(state, permit_open=settings.ssh_permit_open)
        if settings.ssh_permit_listen:
            state = dataclasses.replace(state, permit_listen=settings.ssh_permit_listen)
        return state

    app[LOAD_STATE] = load_state
    hub = SyncHub(load_state, registry, current_serial=store.serial)
    app[HUB] = hub

    async def store_ctx(_app: web.Application) -> AsyncIterator[None]:
        await store.migrate()
        await store.start_listening()
        event(log, "mgmt.store_ready", backend="postgresql" if store.is_postgres else "sqlite",
              serial=await store.serial())
        yield
        await store.close()

    async def hub_ctx(_app: web.Application) -> AsyncIterator[None]:
        store.add_listener(hub.changed)
        issuer = app[ISSUER]
        if issuer is not None:
            issuer.on_keys_changed(lambda: store.bump_serial("issuer.keys_changed"))
            registry.add_text_source(issuer.metrics.render)
        hub.start()
        yield
        store.remove_listener(hub.changed)
        await hub.close()

    app.cleanup_ctx.append(store_ctx)
    app[ISSUER] = _setup_issuer(app, store, settings)  # its own startup hook runs after store_ctx
    app.cleanup_ctx.append(hub_ctx)
    if settings.audit_retention:
        app.cleanup_ctx.append(lambda _app: prune_events(app[EVENTS], settings.audit_retention, registry))

    async def on_shutdown(_app: web.Application) -> None:
        await hub.going_away()

    app.on_shutdown.append(on_shutdown)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_routes(enrol.routes)
    app.router.add_routes(account.routes)
    app.router.add_routes(peers.routes)  # before peer_admin: /api/peers/sync must win over /api/peers/{id}
    for admin in (users, groups, setup_keys, policies, peer_admin, audit):
        app.router.add_routes(admin.routes)
    app.router.add_routes(subsystems.routes)
    app.router.add_routes(signing_keys.routes)
    return app
