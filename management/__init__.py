"""meshmgmt: the management server (store, OIDC issuer, policies, network maps, audit).

Layout (one job per module; pure cores, I/O at the edges):

    state.py      MeshState snapshot records (pure data)
    netmap.py     policy → per-peer NetworkMap, ssh_access, reachable_peers (pure)
    store/        SQLAlchemy models, engine/sessions/serial/change feed, snapshot loader,
                  Alembic runner, password helpers
    migrations/   Alembic environment and revisions
    sync.py       sync hub: recompute maps on change, push over WebSockets
    events.py     audit log: validate, store, list, follow
    api/          aiohttp routes, one module per collection (see api/__init__.py)
    app.py        create_app(settings, store): wiring, error middleware, /healthz, /metrics
    openapi.py    the OpenAPI document of the REST API
    metrics.py    Prometheus text exposition
    ratelimit.py  token-bucket rate limiter (registration here, sign-in in idp)
    settings.py   MgmtSettings, errors.py the exception tree
    bootstrap.py  what `init` and `serve` do; cli.py / cli_admin.py the `meshmgmt` command (cli_calls.py: its API calls and output)
    idp/          the embedded OIDC issuer (see docs/idp.md)
"""
