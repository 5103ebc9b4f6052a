"""The token broker: a second hop without handing over credentials (docs/delegation.md).

    A (meshssh -A --delegate-to C B)          B (session of the user)              C
    ┌──────────────────────────────┐ agent   ┌────────────────────────────┐
    │ Broker: unix socket 0700     │◀channel─│ SSH_AUTH_SOCK (meshsshd's   │
    │  ├ ssh-agent requests ──▶ $SSH_AUTH_SOCK (only with -A)            │
    │  └ ssh-token@meshsshd: check │         │ meshssh C: no login, asks   │──token──▶ C
    │    C against --delegate-to,  │         │ the broker for C's host keys│
    │    mint a token aud=C via=B  │         │ and one SSH token for C     │
    └──────────────────────────────┘         └────────────────────────────┘

The broker rides on ordinary SSH agent forwarding: the client on A serves a local agent
socket and forwards it to B. Plain agent requests are passed through to the user's
real agent (when `-A` was given and one exists), so `ssh -A` style key-based second
hops keep working. Two agent *extension* requests (SSH_AGENTC_EXTENSION,
draft-miller-ssh-agent) carry the delegation:

- `peers@meshsshd` `{"peer": "C"}` → C's PeerInfo (host keys, mesh IP) and the
  management URL, so B can verify C's host key without a login of its own;
- `ssh-token@meshsshd` `{"peer": "<id>"}` → a fresh SSH token for C only (aud = C,
  ~60 s, one use, `via` = B's peer id), minted by A's client through token exchange.

Both answer only for peers on the delegation list; B never sees the refresh token, the
login access token or a token for any other peer. A refusal is explained on both sides:
B's meshssh prints it, A's prints a one-line notice. Every grant is printed on A too, a
connection's broker mints at most `--delegate-max` tokens, and with `--delegate-confirm`
each one waits for a yes from the user's askpass program (client/askpass.py).

Pure parts (the wire framing in client/agent_wire.py, the delegation list, the verdict)
are functions over values; `Broker` (A) and `BrokerClient`/`BrokerSession` (B, in
client/broker_client.py) are the thin I/O edges.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshsshd.netmap import PeerInfo

from .agent_wire import (AGENT_FAILURE, AGENT_IDENTITIES_ANSWER, AGENTC_REQUEST_IDENTITIES, EXT_PEERS, EXT_TOKEN,
                         MAX_MESSAGE, frame, parse_extension, parse_json_arg, parse_query_reply, query_reply, reply)
from .broker_client import BrokerSession
from .errors import AccessDenied, ClientError, UsageError
from .options import DEFAULT_BUDGET

if TYPE_CHECKING:
    from .auth import ExchangeResult, Session
    from .target import Target

EXTENSIONS = (EXT_TOKEN, EXT_PEERS)

MAX_CONCURRENT = 4  # token requests answered at once; more wait their turn
PEERS_MAX_AGE = 30.0  # the broker's copy of the peer list
PEERS_REFRESH_MIN = 5.0  # an unknown name refetches the list at most this often


# ---------------------------------------------------------------- the delegation list (pure)

def printable(text: str, limit: int = 253) -> str:
    """B chooses the names it asks for, and A prints them: no terminal control sequences."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _norm(text: str) -> str:
    return text.strip().rstrip(".").lower()


@dataclass(frozen=True)
class DelegationList:
    """What `--delegate-to` named: peer names, FQDNs, mesh IPs, ids, `group:NAME`, `*`.

    Empty means token delegation is off (bare `-A`): the safe default, so that forwarding
    an agent never hands out SSH tokens the user did not name.
    """

    entries: tuple[str, ...] = ()

    @classmethod
    def parse(cls, values: Iterable[str]) -> DelegationList:
        out: list[str] = []
        for value in values:
            for item in value.split(","):
                item = item.strip()
                if not item:
                    continue
                if item.lower().startswith("group:") and not item[6:].strip():
                    raise UsageError(f"--delegate-to: {item!r} names no group")
                if item not in out:
                    out.append(item)
        if any(v for v in values) and not out:
            raise UsageError("--delegate-to: name at least one peer, group:NAME or *")
        return cls(tuple(out))

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def describe(self) -> str:
        return ", ".join(self.entries)

    def allows(self, peer: PeerInfo) -> bool:
        names = {_norm(peer.name), _norm(peer.fqdn), _norm(peer.mesh_ip), peer.id.lower()}
        if peer.fqdn:
            names.add(_norm(peer.fqdn).split(".")[0])
        have_groups = {g.lower() for g in peer.groups}
        for e in self.entries:
            if e == "*":
                return True
            if e.lower().startswith("group:"):
                if e[6:].strip().lower() in have_groups:
                    return True
            elif _norm(e) in names:
                return True
        return False


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""  # stable code: delegation-off | unknown-peer | not-listed | no-ssh | budget | declined
    message: str = ""


def judge(delegation: DelegationList, asked: str, peer: PeerInfo | None, identity: str) -> Verdict:
    """May the session on B get a token (or host keys) for `asked`?"""
    shown = asked if len(asked) <= 80 else asked[:40] + "…"
    if not delegation.enabled:
        return Verdict(False, "delegation-off",
                       f"token delegation is off: meshssh -A alone forwards only your ssh-agent; "
                       f"start it with --delegate-to {shown} to allow {shown}")
    if peer is None:
        return Verdict(False, "unknown-peer", f"{shown} is not a peer {identity} may reach")
    if not delegation.allows(peer):
        return Verdict(False, "not-listed", f"{peer.name} is not in --delegate-to ({delegation.describe()})")
    if not peer.ssh_enabled:
        return Verdict(False, "no-ssh", f"{peer.name} is not SSH-enabled")
    return Verdict(True)


def origin_name() -> str:
    """How B's user is told where the decision was made: our peer's name, else the host."""
    from .target import own_peers

    names = {p.name for p in own_peers() if p.name}
    return names.pop() if len(names) == 1 else socket.gethostname() or "your machine"


# ---------------------------------------------------------------- A: the broker

@dataclass
class Broker:
    """Serves one forwarded agent socket for the connection to `via` (peer B)."""

    session: Session
    delegation: DelegationList
    via: PeerInfo
    upstream: str | None = None  # the real ssh-agent ($SSH_AUTH_SOCK), only with -A
    origin: str = field(default_factory=origin_name)
    say: Callable[[str], None] = field(default=lambda text: _stderr(text))
    path: str = ""
    _dir: str = ""
    _server: Any = None
    _peers: list[PeerInfo] = field(default_factory=list)
    _peers_at: float = 0.0
    budget: int = DEFAULT_BUDGET
    confirm_with: str | None = None  # the askpass program of --delegate-confirm
    granted: int = 0
    refused: int = 0
    _reserved: int = 0  # grants counted against the budget, including those in flight
    _asking: asyncio.Lock = field(default_factory=asyncio.Lock)
    _busy: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT))
    _signals: dict[int, Any] = field(default_factory=dict)

    async def start(self) -> str:
        self._dir = tempfile.mkdtemp(prefix="meshssh-broker-")
        os.chmod(self._dir, 0o700)
        atexit.register(shutil.rmtree, self._dir, True)
        self.path = os.path.join(self._dir, "agent.sock")
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)
        self._clean_up_on_signals()
        return self.path

    def _clean_up_on_signals(self) -> None:
        """atexit does not run when a signal ends us — and OpenSSH ends its ProxyCommand
        with SIGHUP — so remove the socket directory first, then die of the signal as
        before. Only where nobody else handles the signal."""
        def handler(signum: int, frame: Any) -> None:
            shutil.rmtree(self._dir, ignore_errors=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        for sig in (signal.SIGHUP, signal.SIGTERM):
            try:
                if signal.getsignal(sig) == signal.SIG_DFL:
                    self._signals[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: atexit is all we have
                return

    async def close(self) -> None:
        for sig, old in self._signals.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, old)
        self._signals.clear()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def close_with(self, conn: Any) -> None:
        """Stop serving once the SSH connection to B is gone."""
        async def waiter() -> None:
            with contextlib.suppress(Exception):
                await conn.wait_closed()
            await self.close()
        asyncio.ensure_future(waiter())

    # -- one agent connection from B (each forwarded channel is one)
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        up_tried = False
        try:
            while True:
                try:
                    head = await reader.readexactly(4)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                (n,) = struct.unpack(">I", head)
                if n == 0 or n > MAX_MESSAGE:
                    return
                payload = await reader.readexactly(n)
                ext = parse_extension(payload)
                if ext is not None and ext[0] in EXTENSIONS:
                    async with self._busy:  # B cannot make A run unbounded exchanges at once
                        answer = await self._answer(ext[0], ext[1])
                else:
                    if not up_tried:
                        up_tried = True
                        up = await self._open_upstream()
                    if ext is not None and ext[0] == "query":
                        theirs = parse_query_reply(await _relay(up, payload)) if up else []
                        answer = query_reply([*theirs, *EXTENSIONS])
                    elif up is not None:
                        answer = await _relay(up, payload)
                    elif payload[0] == AGENTC_REQUEST_IDENTITIES:
                        answer = bytes([AGENT_IDENTITIES_ANSWER]) + struct.pack(">I", 0)
                    else:
                        answer = bytes([AGENT_FAILURE])
                writer.write(frame(answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return
        finally:
            for w in ((up[1],) if up else ()) + (writer,):
                w.close()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        if not self.upstream:
            return None
        try:
            return await asyncio.open_unix_connection(self.upstream)
        except OSError:
            return None

    # -- our extensions
    async def _answer(self, name: str, rest: bytes) -> bytes:
        try:
            return await self._extension(name, rest)
        except Exception as exc:  # noqa: BLE001 — B gets a reason, the broker keeps serving
            return self._refuse("?", "internal", f"{type(exc).__name__}: {exc}")

    async def _extension(self, name: str, rest: bytes) -> bytes:
        try:
            doc = parse_json_arg(rest)
            asked = printable(str(doc.get("peer", "")))
            if not asked:
                raise ValueError("no peer named")
        except ValueError as exc:
            return reply(False, {"error": "bad-request", "message": f"malformed {name} request: {exc}",
                                 "origin": self.origin})
        try:
            found = await asyncio.to_thread(self._lookup, asked)
        except ClientError as exc:
            return self._refuse(asked, "management", str(exc))
        verdict = judge(self.delegation, asked, found, self.session.identity)
        peer = found
        if not verdict.allowed:
            return self._refuse(asked, verdict.reason, verdict.message)
        assert peer is not None
        if name == EXT_PEERS:
            return reply(True, {"peer": peer.to_dict(), "management_url": self.session.login.management_url,
                                "identity": self.session.identity, "origin": self.origin})
        if self._reserved >= self.budget:
            return self._refuse(peer.name, "budget",
                                f"this connection's budget of {self.budget} delegated tokens is spent "
                                f"(--delegate-max); reconnect to {self.via.name} for a fresh one")
        self._reserved += 1  # before any await: concurrent requests cannot overrun the budget
        granted = False
        try:
            if self.confirm_with and not await self._confirmed(peer):
                return self._refuse(peer.name, "declined", "not confirmed (--delegate-confirm)")
            try:
                res = await asyncio.to_thread(self._mint, peer)
            except ClientError as exc:
                return self._refuse(peer.name, "management", str(exc))
            granted = True
        finally:
            if not granted:  # refused or failed: the slot is not spent
                self._reserved -= 1
        self.granted += 1
        self.say(f"delegated a token for {peer.name} to the session on {self.via.name} "
                 f"({self.granted} of {self.budget} for this connection)")
        return reply(True, {"token": res.token, "peer": peer.id, "name": peer.name,
                            "exp": res.exp, "origin": self.origin})

    async def _confirmed(self, peer: PeerInfo) -> bool:
        """One question at a time, so that each yes answers exactly one token."""
        from .askpass import confirm

        assert self.confirm_with is not None
        async with self._asking:
            return await confirm(self.confirm_with,
                                 f"Allow the session on {self.via.name} a token for {peer.name} "
                                 f"as {self.session.identity}?")

    def _refuse(self, asked: str, reason: str, message: str) -> bytes:
        self.refused += 1
        shown = asked if len(asked) <= 80 else asked[:40] + "…"
        self.say(f"refused a token for {shown} asked through {self.via.name}: {message}")
        return reply(False, {"error": reason, "message": message, "origin": self.origin})

    def _lookup(self, asked: str) -> PeerInfo | None:
        """The peer in the user's own list (with its groups); an unknown name refetches
        the list, at most every PEERS_REFRESH_MIN seconds (B must not make A hammer
        management)."""
        from .peers import match_peer, parse_peer_list

        now = time.monotonic()
        if not self._peers or now - self._peers_at > PEERS_MAX_AGE:
            self._peers = parse_peer_list(self.session.get_api("/api/me/peers"))
            self._peers_at = now
        hit = match_peer(self._peers, asked)
        if hit is None and now - self._peers_at > PEERS_REFRESH_MIN:
            self._peers = parse_peer_list(self.session.get_api("/api/me/peers"))
            self._peers_at = now
            hit = match_peer(self._peers, asked)
        return hit

    def _mint(self, peer: PeerInfo) -> ExchangeResult:
        """A fresh token for this peer only, via B; never cached (one use)."""
        from . import http
        from .auth import (ACCESS_TOKEN_TYPE, EXCHANGE_GRANT, SSH_TOKEN_TYPE, parse_exchange)

        s = self.session
        fields = [
            ("grant_type", EXCHANGE_GRANT), ("subject_token", s.access_token()),
            ("subject_token_type", ACCESS_TOKEN_TYPE), ("requested_token_type", SSH_TOKEN_TYPE),
            ("client_id", s.login.client_id), ("audience", peer.id), ("via", self.via.id),
        ]
        status, doc = http.post_form(s.login.token_endpoint, fields)
        if status == 401 or (isinstance(doc, dict) and doc.get("error") in ("invalid_token", "invalid_request")
                             and "subject_token" in str(doc.get("error_description", ""))):
            fields[1] = ("subject_token", s.access_token(force=True))
            status, doc = http.post_form(s.login.token_endpoint, fields)
        res = parse_exchange(status, doc, [(peer.id, peer.name)], s.identity, time.time())[peer.id]
        if res.error:
            raise AccessDenied(res.error)
        return res


async def _relay(up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, payload: bytes) -> bytes:
    """One request/answer with the real agent (the agent protocol is strictly in turn)."""
    if up is None:
        return bytes([AGENT_FAILURE])
    r, w = up
    w.write(frame(payload))
    await w.drain()
    (n,) = struct.unpack(">I", await r.readexactly(4))
    if n == 0 or n > MAX_MESSAGE:
        raise ConnectionError("oversized agent answer")
    return await r.readexactly(n)


def _stderr(text: str) -> None:
    """One line to our stderr; with \r when it is a terminal, which may be in raw mode
    (an interactive session to B is running while the broker speaks)."""
    with contextlib.suppress(OSError, ValueError):
        end = "\r\n" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"meshssh: {text}{end}")
        sys.stderr.flush()


async def start_broker(session: Any, via: PeerInfo, delegate_to: Sequence[str], agent: bool | None,
                       upstream: str | None = None, budget: int = DEFAULT_BUDGET,
                       confirm: bool = False) -> Broker | None:
    """The agent socket to forward to `via`, or None when nothing should be forwarded.

    -A passes ssh-agent requests through to $SSH_AUTH_SOCK; --delegate-to enables tokens,
    at most `budget` of them, each asked of the user first with `confirm`.
    A session that is itself delegated (no login here) forwards nothing of its own: the
    agent it would forward is the broker on A, which records only the first hop.
    """
    if isinstance(session, BrokerSession):
        return None
    delegation = DelegationList.parse(delegate_to)
    if not (agent or delegation.enabled):
        return None
    if agent and not upstream:
        upstream = os.environ.get("SSH_AUTH_SOCK")
    elif not agent:
        upstream = None
    from .askpass import askpass_program

    program = askpass_program() if confirm and delegation.enabled else None
    broker = Broker(session=session, delegation=delegation, via=via, upstream=upstream or None,
                    budget=budget, confirm_with=program)
    await broker.start()
    return broker


async def agent_to_forward(args: Any, session: Any, target: Target) -> tuple[Broker | None, Any]:
    """What `meshssh` forwards as the agent to `target`: (broker to close, asyncssh's
    `agent_forwarding` value — False, or the broker's socket path)."""
    delegate_to = tuple(getattr(args, "delegate_to", ()) or ())
    if isinstance(session, BrokerSession):
        if args.agent or delegate_to:
            _stderr("not forwarding an agent further: this session's agent is the token broker "
                    "of your client on another peer, and delegation goes one hop only")
        return None, False
    broker = await start_broker(session, target.peer, delegate_to, args.agent,
                                budget=getattr(args, "delegate_max", None) or DEFAULT_BUDGET,
                                confirm=bool(getattr(args, "delegate_confirm", False)))
    return broker, (broker.path if broker is not None else False)
