"""The peer's side of the management wire contract (docs/protocol.md), behind one seam.

`ManagementClient` is what the agent needs: register, report itself, hold the sync stream,
post audit events. `HTTPManagementClient` speaks HTTP/WebSocket with aiohttp; tests put
a failing implementation in its place to inject outages. aiohttp errors are translated
here, at one boundary, into the three exceptions the agent acts on:

    ManagementUnavailable   network error, 5xx, timeout   → retry with backoff
    ManagementRejected      4xx with a JSON error          → stop and say why (bad setup key)
    PeerDeleted             401 / "peer-deleted" message    → check again with backoff; after
                                                              repeated refusals stop serving
                                                              and forget the credential
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import MeshsshdError
from .peerproof import ProofError, prove
from .state import Credential


def management_destinations(url: str) -> tuple[str, ...]:
    """The management server as PermitOpen entries (`address:port`), one per address its
    host resolves to (blocking: run in a thread). Local forwards may not reach it unless
    permit_open names it (`meshsshd/permit_open.py`). () when the host does not resolve."""
    parts = urlsplit(url)
    if not parts.hostname:
        return ()
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return ()
    addresses = dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos)
    return tuple(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses)


class ManagementUnavailable(MeshsshdError):
    """Management cannot be reached right now; try again later."""


class ManagementRejected(MeshsshdError):
    """Management answered with a refusal that retrying will not change."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"management refused ({status} {code}): {message}", message)
        self.status = status
        self.code = code


class PeerDeleted(MeshsshdError):
    """This peer's credential no longer exists at management."""

    exit_code = 3


@dataclass(frozen=True)
class Registration:
    setup_key: str
    wg_public_key: str
    ssh_host_key: str
    ssh_host_keys: tuple[str, ...]
    hostname: str
    flags: dict[str, bool]
    version: str
    endpoints: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "setup_key": self.setup_key,
            "wg_public_key": self.wg_public_key,
            "ssh_host_key": self.ssh_host_key,
            "ssh_host_keys": list(self.ssh_host_keys),
            "hostname": self.hostname,
            "flags": self.flags,
            "version": self.version,
            "endpoints": list(self.endpoints),
        }


class ManagementClient(Protocol):
    async def register(self, req: Registration, wg_private: X25519PrivateKey) -> dict[str, Any]: ...
    async def update_self(self, cred: Credential, body: dict[str, Any]) -> None: ...
    def sync(self, cred: Credential) -> AsyncIterator[dict[str, Any]]: ...
    async def post_events(self, cred: Credential, events: list[dict[str, Any]]) -> None: ...
    async def close(self) -> None: ...


def _peer_auth(cred: Credential) -> dict[str, str]:
    return {"Authorization": f"Peer {cred.peer_id}:{cred.credential}"}


async def _raise_for(resp: aiohttp.ClientResponse, peer_request: bool) -> None:
    if resp.status < 400:
        return
    try:
        doc = await resp.json(content_type=None)
    except (json.JSONDecodeError, aiohttp.ContentTypeError, ValueError):
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    code = str(doc.get("error", "")) or f"http-{resp.status}"
    message = str(doc.get("message") or doc.get("error_description") or resp.reason or "")
    if peer_request and resp.status == 401:
        raise PeerDeleted(f"management does not know this peer's credential any more: {message}")
    if resp.status >= 500 or resp.status == 429:
        raise ManagementUnavailable(f"management answered {resp.status} {code}: {message}")
    raise ManagementRejected(resp.status, code, message)


class HTTPManagementClient:
    """aiohttp implementation; one ClientSession for the daemon's lifetime."""

    def __init__(self, base_url: str, timeout: float = 15.0, heartbeat: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._heartbeat = heartbeat
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None,
                    peer_request: bool) -> dict[str, Any]:
        try:
            async with self._http().post(self.base_url + path, json=body, headers=headers) as resp:
                await _raise_for(resp, peer_request)
                if resp.status == 204:
                    return {}
                doc = await resp.json(content_type=None)
                return doc if isinstance(doc, dict) else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ManagementUnavailable(f"cannot reach management at {self.base_url}: {exc!s}") from exc

    async def register(self, req: Registration, wg_private: X25519PrivateKey) -> dict[str, Any]:
        """Ask for a challenge, answer it with the WireGuard key, register (docs/protocol.md)."""
        challenge = await self._post("/api/peers/challenge", {"wg_public_key": req.wg_public_key}, None,
                                     peer_request=False)
        try:
            body = prove(req.to_dict(), wg_private, challenge)
        except ProofError as exc:
            raise ManagementRejected(200, "bad-response", f"registration challenge unusable: {exc}") from exc
        doc = await self._post("/api/peers/register", body, None, peer_request=False)
        for key in ("peer_id", "mesh_ip", "credential"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise ManagementRejected(200, "bad-response", f"registration answer lacks {key!r}")
        return doc

    async def update_self(self, cred: Credential, body: dict[str, Any]) -> None:
        await self._post("/api/peers/self", body, _peer_auth(cred), peer_request=True)

    async def post_events(self, cred: Credential, events: list[dict[str, Any]]) -> None:
        await self._post("/api/peers/events", {"events": events}, _peer_auth(cred), peer_request=True)

    async def sync(self, cred: Credential) -> AsyncIterator[dict[str, Any]]:
        """Yield each message of one sync connection; returns when the server closes it."""
        url = self.base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            ws = await self._http().ws_connect(
                url + "/api/peers/sync", headers=_peer_auth(cred), heartbeat=self._heartbeat,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise PeerDeleted("management refused this peer's credential (401)") from exc
            raise ManagementUnavailable(f"sync stream refused: {exc.status} {exc.message}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ManagementUnavailable(f"cannot reach management at {self.base_url}: {exc!s}") from exc
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        doc = json.loads(msg.data)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(doc, dict):
                        yield doc
                elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.CLOSING):
                    break
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ManagementUnavailable(f"sync stream broke: {exc!s}") from exc
        finally:
            await ws.close()
