"""What `meshmgmt init` and `meshmgmt serve` do behind the CLI: first-run setup, then serving."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from sqlalchemy import delete, func, select

from meshsshd.logs import setup_logging

from .boxkey import BOX_KEY_FILE, load_or_create_box_key
from .errors import BadRequest, ManagementError
from .store import AdminToken, Store, User, hash_password_async, hash_secret, utcnow

TOKEN_FILE = "admin.token"
ADMIN_TOKEN_LIFETIME = 90 * 86400  # seconds; `--admin-token-lifetime` changes it


class AlreadyInitialised(ManagementError):
    status = 409
    code = "already_initialised"


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def _new_admin_token(lifetime: int) -> tuple[str, AdminToken]:
    """A fresh admin token and its row (digest and expiry only)."""
    token = "mt_" + secrets.token_urlsafe(32)
    return token, AdminToken(token_hash=hash_secret(token), name="init",
                             expires_at=utcnow() + timedelta(seconds=lifetime))


def already_initialised(data_dir: Path) -> str | None:
    """Why `init` must not run on `data_dir` (it holds an admin token), else None: asked
    before anything else (the password's checks included), since nothing would change."""
    token_file = data_dir / TOKEN_FILE
    if token_file.exists():
        return f"{data_dir} is already initialised ({token_file} exists); nothing changed"
    return None


def require_store_dir(data_dir: Path, database: str | None) -> None:
    """`serve` on a data dir that `init` never made is a typo: refuse before creating a
    directory or an empty SQLite database there."""
    from .store.engine import sqlite_url

    hint = f"create it with `meshmgmt init --data-dir {data_dir}`"
    if not data_dir.is_dir():
        raise BadRequest(f"{data_dir}: no such directory; {hint}", code="not_initialised")
    if database is None and not Path(sqlite_url(data_dir).split(":///", 1)[1]).exists():
        raise BadRequest(f"{data_dir} holds no store (no meshmgmt.db); {hint}, or name the "
                         "shared database with --database", code="not_initialised")


async def initialise(data_dir: Path, admin_email: str, password: str | None, database: str | None,
                     token_lifetime: int = ADMIN_TOKEN_LIFETIME) -> dict[str, Any]:
    from .api._validate import email as valid_email

    email = valid_email(admin_email, "admin-email")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token_file = data_dir / TOKEN_FILE
    refusal = already_initialised(data_dir)
    if refusal is not None:
        raise AlreadyInitialised(refusal)
    store = Store.for_data_dir(data_dir, database)
    try:
        await store.migrate()
        async with store.session() as s:
            if (await s.execute(select(func.count()).select_from(AdminToken))).scalar():
                raise AlreadyInitialised("the store is already initialised (it has an admin token); nothing changed")
        from .idp import SECRET_FILE, ensure_signing_key, load_or_create_key_secret

        kid = await ensure_signing_key(store, secret=load_or_create_key_secret(data_dir / SECRET_FILE))
        token, token_row = _new_admin_token(token_lifetime)
        pw_hash = await hash_password_async(password) if password else None
        async with store.change("init") as s:
            user = (await s.execute(select(User).where(User.email == email))).scalar_one_or_none()
            if user is None:
                s.add(User(email=email, name=email.split("@")[0], role="admin", password_hash=pw_hash))
            else:
                user.role = "admin"
                if pw_hash:
                    user.password_hash = pw_hash
            s.add(token_row)
        _write_secret(token_file, token)
        load_or_create_box_key(data_dir)  # now, so it can be copied to replicas before they start
    finally:
        await store.close()
    return {"email": email, "token_file": str(token_file), "kid": kid, "expires_at": token_row.expires_at,
            "secret_file": str(data_dir / SECRET_FILE), "box_key_file": str(data_dir / BOX_KEY_FILE)}


async def rotate_admin_token(data_dir: Path, database: str | None,
                             lifetime: int = ADMIN_TOKEN_LIFETIME) -> dict[str, Any]:
    """Replace every admin token by a new one in DIR/admin.token; the old ones stop
    working at once. Offline (the store and the data dir, no API), so it also works
    when the token has expired or leaked."""
    store = Store.for_data_dir(data_dir, database)
    token_file = data_dir / TOKEN_FILE
    staging = data_dir / (TOKEN_FILE + ".new")
    try:
        await _check_initialised(store)
        token, row = _new_admin_token(lifetime)
        staging.unlink(missing_ok=True)  # left by an interrupted rotation: it was never valid
        _write_secret(staging, token)
        async with store.write() as s:
            revoked = (await s.execute(delete(AdminToken))).rowcount
            s.add(row)
        os.replace(staging, token_file)
    finally:
        staging.unlink(missing_ok=True)
        await store.close()
    return {"token_file": str(token_file), "expires_at": row.expires_at, "revoked": int(revoked or 0)}


async def _check_initialised(store: Store) -> None:
    await store.migrate()
    async with store.session() as s:
        if not (await s.execute(select(func.count()).select_from(AdminToken))).scalar():
            raise BadRequest("the store is not initialised: run `meshmgmt init` first")


class _ClientGarbageIsNotAnError(logging.Filter):
    """aiohttp logs unparsable requests (NUL bytes in headers, bad request lines) at
    ERROR although it answers them with 400; they are the client's fault: warn."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def run_server(data_dir: Path, host: str, port: int, *, database: str | None, public_url: str, network: str,
               dns_domain: str, log_level: str = "info", register_rate: float = 2.0,
               register_burst: int = 20, trusted_proxies: tuple[str, ...] = (),
               refresh_token_lifetime: int = 30 * 86400, ssh_permit_open: tuple[str, ...] = (),
               **more: Any) -> None:
    """`more`: further `MgmtSettings` fields, named as there (metrics_token_file, ...)."""
    from aiohttp import web

    from .app import create_app
    from .settings import MgmtSettings

    from .serving import ConnectionCap, install_flood_filter, serve

    setup_logging(log_level)
    logging.getLogger("aiohttp.server").addFilter(_ClientGarbageIsNotAnError())
    install_flood_filter()
    settings = MgmtSettings(data_dir=data_dir, database=database, public_url=public_url, network=network,
                            dns_domain=dns_domain, register_rate=register_rate,
                            register_burst=register_burst, trusted_proxies=trusted_proxies,
                            refresh_token_lifetime=refresh_token_lifetime, ssh_permit_open=ssh_permit_open,
                            **more)
    require_store_dir(data_dir, database)

    async def make_app() -> web.Application:
        store = Store.for_data_dir(data_dir, database)
        try:
            await _check_initialised(store)
        finally:
            await store.close()
        return create_app(settings)

    from .idp import KeySecretError

    try:
        cap = ConnectionCap(settings.max_connections_per_client, settings.trusted_proxies)
        asyncio.run(serve(make_app(), host, port, cap, header_timeout=settings.header_timeout))
    except KeySecretError as exc:  # raised by the issuer's startup: a setup problem, not a crash
        raise BadRequest(str(exc), code="issuer_secret") from None


__all__ = ["AlreadyInitialised", "initialise", "rotate_admin_token", "run_server"]
