"""The token broker's pure core (delegation list, verdicts, agent wire format) and its
agent pass-through, in-process over real unix sockets. Token minting against a real
management server is tested in tests/integration/test_delegation.py."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest

from meshssh_client import broker
from meshssh_client import agent_wire
from meshssh_client.agent_wire import (
    AGENT_EXTENSION_FAILURE,
    AGENT_FAILURE,
    AGENT_IDENTITIES_ANSWER,
    AGENT_SUCCESS,
    AGENTC_REQUEST_IDENTITIES,
    EXT_PEERS,
    EXT_TOKEN,
)
from meshssh_client.broker import Broker, DelegationList, judge
from meshssh_client.broker_client import BrokerClient, BrokerSession, DelegationRefused, broker_session
from meshssh_client.errors import UsageError
from meshsshd.netmap import PeerInfo

DB1 = PeerInfo(id="p-db1", name="db-1", fqdn="db-1.mesh.internal", mesh_ip="100.64.0.30",
               ssh_host_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ",),
               ssh_enabled=True)
WEB1 = PeerInfo(id="p-web1", name="web-1", fqdn="web-1.mesh.internal", mesh_ip="100.64.0.20", ssh_enabled=True)
HOP = PeerInfo(id="p-hop", name="hop-b", fqdn="hop-b.mesh.internal", mesh_ip="100.64.0.5", ssh_enabled=True)


# ------------------------------------------------------------------ the delegation list

def test_parse_splits_commas_and_repeats() -> None:
    d = DelegationList.parse(["db-1, group:db", "web-1", "db-1"])
    assert d.entries == ("db-1", "group:db", "web-1") and d.describe() == "db-1, group:db, web-1"
    assert not DelegationList.parse([]).enabled


@pytest.mark.parametrize("values", [pytest.param([","], id="only-commas"), pytest.param(["group:"], id="empty-group")])
def test_parse_refuses_empty_entries(values: list[str]) -> None:
    with pytest.raises(UsageError):
        DelegationList.parse(values)


@pytest.mark.parametrize(
    ("entry", "groups", "allowed"),
    [
        pytest.param("db-1", (), True, id="name"),
        pytest.param("DB-1", (), True, id="name-case"),
        pytest.param("db-1.mesh.internal.", (), True, id="fqdn-dot"),
        pytest.param("100.64.0.30", (), True, id="mesh-ip"),
        pytest.param("p-db1", (), True, id="peer-id"),
        pytest.param("group:dbs", ("dbs", "all"), True, id="group"),
        pytest.param("group:DBS", ("dbs",), True, id="group-case"),
        pytest.param("group:web", ("dbs",), False, id="other-group"),
        pytest.param("*", (), True, id="any"),
        pytest.param("db-10", (), False, id="prefix-is-not-a-match"),
        pytest.param("100.64.0.3", (), False, id="other-ip"),
    ],
)
def test_allows(entry: str, groups: tuple[str, ...], allowed: bool) -> None:
    peer = PeerInfo(**{**DB1.__dict__, "groups": groups})
    assert DelegationList.parse([entry]).allows(peer) is allowed


@pytest.mark.parametrize(
    ("entries", "peer", "reason"),
    [
        pytest.param([], DB1, "delegation-off", id="bare-dash-A"),
        pytest.param(["db-1"], None, "unknown-peer", id="unknown-peer"),
        pytest.param(["web-1", "group:web"], DB1, "not-listed", id="not-listed"),
        pytest.param(["*"], PeerInfo(id="x", name="x", fqdn="", mesh_ip="1.2.3.4"), "no-ssh", id="no-ssh"),
        pytest.param(["db-1"], DB1, "", id="allowed"),
    ],
)
def test_judge(entries: list[str], peer: PeerInfo | None, reason: str) -> None:
    v = judge(DelegationList.parse(entries), "db-1", peer, "alice@example.com")
    assert v.allowed is (reason == "") and v.reason == reason


def test_refusal_messages_name_the_fix() -> None:
    off = judge(DelegationList(), "db-1", DB1, "alice@example.com")
    assert "--delegate-to db-1" in off.message
    listed = judge(DelegationList.parse(["web-1,group:web"]), "db-1", DB1, "a")
    assert listed.message == "db-1 is not in --delegate-to (web-1, group:web)"


# ------------------------------------------------------------------ wire format

def test_extension_round_trip() -> None:
    payload = agent_wire.extension_request(EXT_TOKEN, {"peer": "db-1"})
    name, rest = agent_wire.parse_extension(payload)
    assert name == EXT_TOKEN and agent_wire.parse_json_arg(rest) == {"peer": "db-1"}
    assert agent_wire.parse_extension(bytes([AGENTC_REQUEST_IDENTITIES])) is None
    assert agent_wire.parse_extension(bytes([27, 0, 0, 0, 9, 1])) is None  # truncated name


@pytest.mark.parametrize("rest", [b"", b"\x00\x00\x00\x02[]", b"\x00\x00\x00\x02{}x", b"\x00\x00\x00\x05{}"])
def test_malformed_arguments_raise(rest: bytes) -> None:
    with pytest.raises(ValueError):
        agent_wire.parse_json_arg(rest)


def test_replies_and_query() -> None:
    assert agent_wire.parse_reply(agent_wire.reply(True, {"token": "t"})) == (AGENT_SUCCESS, {"token": "t"})
    assert agent_wire.parse_reply(agent_wire.reply(False, {"message": "no"})) == (AGENT_EXTENSION_FAILURE, {"message": "no"})
    assert agent_wire.parse_reply(bytes([AGENT_FAILURE])) == (AGENT_FAILURE, {})
    assert agent_wire.parse_query_reply(agent_wire.query_reply(["a@x", EXT_TOKEN])) == ["a@x", EXT_TOKEN]


# ------------------------------------------------------------------ the broker over sockets

class FakeLogin:
    management_url = "http://mgmt.example:8080"
    client_id = "meshssh"
    token_endpoint = "http://mgmt.example:8080/oauth/token"


class FakeSession:
    """The management seam: a fixed peer list (what /api/me/peers would answer)."""

    identity = "alice@example.com"
    login = FakeLogin()

    def __init__(self) -> None:
        self.calls = 0

    def get_api(self, path: str) -> Any:
        assert path == "/api/me/peers"
        self.calls += 1
        return {"peers": [{**DB1.to_dict(), "groups": ["dbs"]}, {**WEB1.to_dict(), "groups": ["web"]}]}


async def _fake_agent(path: Path) -> asyncio.AbstractServer:
    """A stand-in for ssh-agent: one identity, and its own extension in `query`."""
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = struct.unpack(">I", await r.readexactly(4))
                msg = await r.readexactly(n)
                if msg[0] == AGENTC_REQUEST_IDENTITIES:
                    out = bytes([AGENT_IDENTITIES_ANSWER]) + struct.pack(">I", 1) + \
                        agent_wire.put_string(b"blob") + agent_wire.put_string(b"real-key")
                elif agent_wire.parse_extension(msg) == ("query", b""):
                    out = agent_wire.query_reply(["session-bind@openssh.com"])
                else:
                    out = bytes([AGENT_FAILURE])
                w.write(agent_wire.frame(out))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()
    return await asyncio.start_unix_server(serve, path=str(path))


async def test_broker_passes_agent_requests_through_and_answers_its_extensions(tmp_path: Path) -> None:
    agent = await _fake_agent(tmp_path / "agent.sock")
    said: list[str] = []
    b = Broker(session=FakeSession(), delegation=DelegationList.parse(["group:dbs"]), via=HOP,
               upstream=str(tmp_path / "agent.sock"), origin="hop-a", say=said.append)
    path = await b.start()
    try:
        client = BrokerClient(path)
        ids = await asyncio.to_thread(client.call, bytes([AGENTC_REQUEST_IDENTITIES]))
        assert ids[0] == AGENT_IDENTITIES_ANSWER and b"real-key" in ids
        exts = await asyncio.to_thread(client.extensions)
        assert exts == ["session-bind@openssh.com", EXT_TOKEN, EXT_PEERS]
        sess = BrokerSession(client)
        target = await asyncio.to_thread(sess.resolve_target, "db-1.mesh.internal", None, "alice")
        assert target.peer == PeerInfo(**{**DB1.__dict__, "groups": ("dbs",)}) and target.port == 22022 and target.username == "alice"
        assert sess.login.management_url == FakeLogin.management_url and sess.identity == "alice@example.com"
        with pytest.raises(DelegationRefused) as exc:
            await asyncio.to_thread(sess.resolve_target, "web-1", None, None)
        assert str(exc.value) == ("delegation refused by your client on hop-a: "
                                  "web-1 is not in --delegate-to (group:dbs)")
        assert said == ["refused a token for web-1 asked through hop-b: web-1 is not in --delegate-to (group:dbs)"]
        with pytest.raises(DelegationRefused, match="not a peer alice@example.com may reach"):
            await asyncio.to_thread(sess.ssh_token, "nope", "nope")
        assert b.refused == 2 and b.granted == 0
    finally:
        await b.close()
        agent.close()
        await agent.wait_closed()
    assert not Path(path).exists()


async def test_broker_without_an_agent_has_no_keys_and_is_private(tmp_path: Path) -> None:
    b = Broker(session=FakeSession(), delegation=DelegationList(), via=HOP, origin="hop-a", say=lambda _: None)
    path = await b.start()
    try:
        assert Path(path).stat().st_mode & 0o777 == 0o600
        assert Path(path).parent.stat().st_mode & 0o777 == 0o700
        client = BrokerClient(path)
        ids = await asyncio.to_thread(client.call, bytes([AGENTC_REQUEST_IDENTITIES]))
        assert ids == bytes([AGENT_IDENTITIES_ANSWER]) + struct.pack(">I", 0)
        assert await asyncio.to_thread(client.call, bytes([13]) + b"x") == bytes([AGENT_FAILURE])
        assert await asyncio.to_thread(client.extensions) == [EXT_TOKEN, EXT_PEERS]
        with pytest.raises(DelegationRefused, match="token delegation is off"):
            await asyncio.to_thread(BrokerSession(client).ssh_token, "p-db1", "db-1")
    finally:
        await b.close()


def test_broker_session_only_for_a_broker(tmp_path: Path) -> None:
    assert broker_session({}) is None
    assert broker_session({"SSH_AUTH_SOCK": str(tmp_path / "missing.sock")}) is None


async def test_a_delegated_session_forwards_no_agent_further(capsys: pytest.CaptureFixture[str]) -> None:
    from meshssh_client.target import Target
    from meshssh_client.options import parse_ssh_args

    args = parse_ssh_args(["-A", "--delegate-to", "db-1", "db-1"])
    sess = BrokerSession(BrokerClient("/nonexistent"))
    got = await broker.agent_to_forward(args, sess, Target(peer=DB1, port=22022, username="alice"))
    assert got == (None, False)
    assert "not forwarding an agent further" in capsys.readouterr().err
    plain = parse_ssh_args(["db-1"])
    assert await broker.agent_to_forward(plain, sess, Target(peer=DB1, port=22022, username="a")) == (None, False)
    assert capsys.readouterr().err == ""


async def test_logged_in_client_starts_a_broker_only_when_asked(tmp_path: Path) -> None:
    from meshssh_client.target import Target
    from meshssh_client.options import parse_ssh_args

    target = Target(peer=HOP, port=22022, username="alice")
    assert await broker.agent_to_forward(parse_ssh_args(["hop-b"]), FakeSession(), target) == (None, False)
    b, path = await broker.agent_to_forward(parse_ssh_args(["--delegate-to", "db-1", "hop-b"]), FakeSession(), target)
    try:
        assert path == b.path and b.upstream is None and b.delegation.entries == ("db-1",)
        assert b.via == HOP
    finally:
        await b.close()


@pytest.mark.parametrize(
    ("argv", "dest", "delegate", "command"),
    [
        pytest.param(["--delegate-to", "db-1,group:db", "web-1"], "web-1", ("db-1,group:db",), (), id="separate"),
        pytest.param(["--delegate-to=db-1", "-A", "web-1", "ls"], "web-1", ("db-1",), ("ls",), id="attached"),
        pytest.param(["-A", "web-1", "--delegate-to", "a", "--delegate-to", "b", "--", "meshssh", "c"],
                     "web-1", ("a", "b"), ("meshssh", "c"), id="after-destination-repeated"),
    ],
)
def test_delegate_to_option(argv: list[str], dest: str, delegate: tuple[str, ...], command: tuple[str, ...]) -> None:
    from meshssh_client.options import first_word
    from meshssh_client.options import parse_ssh_args

    args = parse_ssh_args(argv)
    assert (args.destination, args.delegate_to, args.command) == (dest, delegate, command)
    assert argv[first_word(argv)] == dest  # the peer list is not mistaken for a sub-command


def test_delegate_to_needs_a_value() -> None:
    from meshssh_client.options import parse_ssh_args

    with pytest.raises(UsageError, match="--delegate-to needs a value"):
        parse_ssh_args(["web-1", "--delegate-to"])


async def test_names_from_b_are_printed_harmlessly_on_a(tmp_path: Path) -> None:
    said: list[str] = []
    b = Broker(session=FakeSession(), delegation=DelegationList.parse(["db-1"]), via=HOP, origin="hop-a",
               say=said.append)
    path = await b.start()
    try:
        with pytest.raises(DelegationRefused) as exc:
            await asyncio.to_thread(BrokerSession(BrokerClient(path)).ssh_token, "x\x1b]0;pwned\x07y", "x")
    finally:
        await b.close()
    assert "\x1b" not in said[0] and "\x07" not in said[0] and "x?]0;pwned?y" in said[0]
    assert "\x1b" not in str(exc.value)


def test_socket_directory_is_removed_when_a_signal_ends_the_process(tmp_path: Path) -> None:
    """OpenSSH ends its ProxyCommand with SIGHUP; the broker's directory must not stay."""
    import signal as sig
    import subprocess
    import sys

    code = (
        "import asyncio, os, sys\n"
        "from meshssh_client.broker import Broker, DelegationList\n"
        "from meshsshd.netmap import PeerInfo\n"
        "async def main():\n"
        "    b = Broker(session=None, delegation=DelegationList(), via=PeerInfo(id='p', name='b', fqdn='', mesh_ip='1.2.3.4'), origin='a')\n"
        "    print(await b.start(), flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parents[2]))
    try:
        path = Path(proc.stdout.readline().strip())
        assert path.exists()
        proc.send_signal(sig.SIGHUP)
        assert proc.wait(10) == -sig.SIGHUP
        assert not path.parent.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ grants: notice, budget, confirmation

class MintingBroker(Broker):
    """The management seam for minting: a token per call, counted."""

    minted = 0

    def _mint(self, peer: PeerInfo) -> Any:
        from meshssh_client.auth import ExchangeResult

        self.minted += 1
        return ExchangeResult(token=f"tok-{self.minted}", exp=0)


async def _ask_tokens(path: str, n: int) -> list[str]:
    """n token requests from B, as many as possible at once; each token or refusal text."""
    sess = BrokerSession(BrokerClient(path))

    def one() -> str:
        try:
            return sess.ssh_token("p-db1", "db-1").token
        except DelegationRefused as exc:
            return str(exc)
    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(n) as pool:  # not the default pool: the broker needs that one
        return list(await asyncio.gather(*(loop.run_in_executor(pool, one) for _ in range(n))))


async def test_every_grant_is_announced_and_the_budget_holds_under_concurrency() -> None:
    said: list[str] = []
    b = MintingBroker(session=FakeSession(), delegation=DelegationList.parse(["db-1"]), via=HOP,
                      origin="hop-a", say=said.append, budget=3)
    path = await b.start()
    try:
        got = await _ask_tokens(path, 6)
    finally:
        await b.close()
    assert sorted(g for g in got if g.startswith("tok-")) == ["tok-1", "tok-2", "tok-3"]
    refusals = [g for g in got if not g.startswith("tok-")]
    assert len(refusals) == 3 and all("budget of 3 delegated tokens is spent" in r for r in refusals), refusals
    assert b.minted == 3 and b.granted == 3 and b.refused == 3
    grants = [s for s in said if s.startswith("delegated")]
    assert grants == [f"delegated a token for db-1 to the session on hop-b ({i} of 3 for this connection)"
                      for i in (1, 2, 3)]


def _askpass(tmp_path: Path, body: str) -> str:
    script = tmp_path / "askpass"
    script.write_text(f"#!/bin/sh\necho \"$SSH_ASKPASS_PROMPT:$1\" >> {tmp_path}/asked\n{body}\n")
    script.chmod(0o700)
    return str(script)


@pytest.mark.parametrize(
    ("body", "granted"),
    [
        pytest.param("exit 0", True, id="ok-empty"),
        pytest.param("echo yes", True, id="yes"),
        pytest.param("echo no", False, id="no"),
        pytest.param("exit 1", False, id="cancel"),
    ],
)
async def test_confirmation_asks_askpass_before_each_token(tmp_path: Path, body: str, granted: bool) -> None:
    said: list[str] = []
    b = MintingBroker(session=FakeSession(), delegation=DelegationList.parse(["db-1"]), via=HOP,
                      origin="hop-a", say=said.append, confirm_with=_askpass(tmp_path, body))
    path = await b.start()
    try:
        got = await _ask_tokens(path, 2)
    finally:
        await b.close()
    asked = (tmp_path / "asked").read_text().splitlines()
    assert asked == ["confirm:Allow the session on hop-b a token for db-1 as alice@example.com?"] * 2
    if granted:
        assert sorted(got) == ["tok-1", "tok-2"]
    else:
        assert b.minted == 0 and all("not confirmed (--delegate-confirm)" in g for g in got), got
        assert b._reserved == 0  # a declined request does not use up the budget


def test_confirmation_without_askpass_is_a_usage_error() -> None:
    from meshssh_client.askpass import askpass_program

    with pytest.raises(UsageError, match="--delegate-confirm needs SSH_ASKPASS"):
        askpass_program({})
    with pytest.raises(UsageError, match="'/nonexistent/askpass' was not found"):
        askpass_program({"SSH_ASKPASS": "/nonexistent/askpass"})


@pytest.mark.parametrize(
    ("argv", "budget", "confirm"),
    [
        pytest.param(["--delegate-to", "db-1", "web-1"], None, False, id="defaults"),
        pytest.param(["--delegate-max", "2", "--delegate-confirm", "web-1"], 2, True, id="both"),
        pytest.param(["web-1", "--delegate-max=7"], 7, False, id="attached"),
    ],
)
def test_delegate_max_and_confirm_options(argv: list[str], budget: int | None, confirm: bool) -> None:
    from meshssh_client.options import parse_ssh_args

    args = parse_ssh_args(argv)
    assert (args.destination, args.delegate_max, args.delegate_confirm) == ("web-1", budget, confirm)


@pytest.mark.parametrize("value", ["0", "-1", "many", ""])
def test_delegate_max_must_be_positive(value: str) -> None:
    from meshssh_client.options import parse_ssh_args

    with pytest.raises(UsageError, match="--delegate-max: .* is not a positive number"):
        parse_ssh_args(["--delegate-max", value, "web-1"])
