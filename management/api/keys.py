"""Typed application state (aiohttp `web.AppKey`), shared by the app factory and routes."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..events import EventFeed
from ..metrics import Registry
from ..ratelimit import RateLimiter
from ..settings import MgmtSettings
from ..store import Store
from ..sync import SyncHub

STORE = web.AppKey("store", Store)
SETTINGS = web.AppKey("settings", MgmtSettings)
HUB = web.AppKey("hub", SyncHub)
EVENTS = web.AppKey("events", EventFeed)
METRICS = web.AppKey("metrics", Registry)
METRICS_TOKEN = web.AppKey("metrics_token", Any)  # str from --metrics-token-file, or None: /metrics is open
REGISTER_LIMITER = web.AppKey("register_limiter", RateLimiter)
CHALLENGE_LIMITER = web.AppKey("challenge_limiter", RateLimiter)
AUDIT_LIMITER = web.AppKey("audit_limiter", RateLimiter)  # audit events per peer id
BOX_KEY = web.AppKey("box_key", X25519PrivateKey)  # management/boxkey.py
ISSUER = web.AppKey("issuer", Any)  # meshmgmt.idp.Issuer, or None before the issuer exists

# async () -> MeshState with the issuer's URL and JWKS filled in
LOAD_STATE = web.AppKey("load_state", Any)
