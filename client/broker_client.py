"""The B side of token delegation: asking the broker on A, through the forwarded agent
socket in $SSH_AUTH_SOCK, for a peer's host keys and one SSH token (client/broker.py has
the A side and the whole picture, docs/delegation.md the user's view). Blocking sockets,
since `meshssh` on B asks from worker threads; it never holds a credential of its own.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshsshd.netmap import NetmapError, PeerInfo

from .agent_wire import (AGENT_FAILURE, AGENT_SUCCESS, EXT_PEERS, EXT_TOKEN, MAX_MESSAGE, extension_request, frame,
                         parse_query_reply, parse_reply)
from .errors import AccessDenied, ClientError

if TYPE_CHECKING:
    from .auth import ExchangeResult
    from .target import Target


class DelegationRefused(AccessDenied):
    """The client on A said no; the message names the reason and where it was decided."""


class BrokerUnavailable(ClientError):
    pass


class BrokerClient:
    """Blocking client for the broker behind $SSH_AUTH_SOCK (used from worker threads)."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, payload: bytes) -> bytes:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.path)
                s.sendall(frame(payload))
                (n,) = struct.unpack(">I", _recv_exact(s, 4))
                if n > MAX_MESSAGE:
                    raise BrokerUnavailable("the forwarded agent sent an oversized answer")
                return _recv_exact(s, n)
        except (OSError, struct.error) as exc:
            raise BrokerUnavailable(f"the forwarded agent ({self.path}) did not answer: {exc}") from exc

    def extensions(self) -> list[str]:
        try:
            return parse_query_reply(self.call(extension_request("query")))
        except BrokerUnavailable:
            return []

    def request(self, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        try:
            code, answer = parse_reply(self.call(extension_request(name, doc)))
        except ValueError as exc:
            raise BrokerUnavailable(f"the forwarded agent sent a malformed answer: {exc}") from exc
        if code == AGENT_SUCCESS:
            return answer
        if code == AGENT_FAILURE:
            raise BrokerUnavailable("the forwarded agent does not broker meshssh tokens")
        origin = answer.get("origin") or "A"
        message = answer.get("message") or "no reason given"
        raise DelegationRefused(f"delegation refused by your client on {origin}: {message}")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise BrokerUnavailable("the forwarded agent closed the connection")
        buf += chunk
    return buf


@dataclass
class _BrokerLogin:
    management_url: str = ""
    identity: str = ""


class BrokerSession:
    """Stands in for `auth.Session` on B: everything comes from the broker on A.

    Nothing is written to disk here; tokens live only in this process, for one use.
    """

    def __init__(self, client: BrokerClient) -> None:
        self.client = client
        self.login = _BrokerLogin()

    @property
    def identity(self) -> str:
        return self.login.identity or "you"

    def resolve_target(self, host: str, port: int | None, user: str | None) -> Target:
        from meshsshd.netmap import SSH_PORT

        from .target import Target, default_login

        doc = self.client.request(EXT_PEERS, {"peer": host})
        try:
            peer = PeerInfo.from_dict(doc.get("peer") or {})
        except (NetmapError, TypeError, AttributeError, KeyError) as exc:
            raise BrokerUnavailable(f"the forwarded agent sent no usable peer for {host}") from exc
        self.login.management_url = str(doc.get("management_url") or "")
        self.login.identity = str(doc.get("identity") or "")
        return Target(peer=peer, port=port or SSH_PORT, username=user or default_login())

    def ssh_token(self, peer_id: str, name: str, no_cache: bool = False) -> ExchangeResult:
        from .auth import ExchangeResult, token_expiry

        doc = self.client.request(EXT_TOKEN, {"peer": peer_id})
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            raise BrokerUnavailable(f"the forwarded agent sent no token for {name}")
        return ExchangeResult(token=token, exp=token_expiry(token, 60, time.time()))

    def consume(self, peer_id: str, token: str) -> None:
        """Nothing is cached on B, so there is nothing to forget."""


def broker_session(environ: dict[str, str] | None = None) -> BrokerSession | None:
    """A BrokerSession when $SSH_AUTH_SOCK is a meshssh broker, else None."""
    env = os.environ if environ is None else environ
    path = env.get("SSH_AUTH_SOCK")
    if not path:
        return None
    client = BrokerClient(path)
    if EXT_TOKEN not in client.extensions():
        return None
    return BrokerSession(client)
