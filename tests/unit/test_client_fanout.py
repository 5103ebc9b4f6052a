"""`meshssh exec` fan-out: host expansion, line splitting, capture bounds, exit codes,
the token pool's one-request behaviour, and the `-s` subsystem option."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

from meshssh_client.auth import ExchangeResult
from meshssh_client.errors import AccessDenied, UsageError
from meshssh_client.fanout import (
    MAX_LINE,
    Capture,
    HostResult,
    exit_code,
    expand_hosts,
    read_hosts_file,
    split_hosts,
    split_lines,
    summary_lines,
)
from meshssh_client.cli_exec import exec_command
from meshssh_client.options import parse_ssh_args, want_pty
from meshssh_client.tokenpool import MAX_AUDIENCES, TokenPool
from meshsshd.netmap import PeerInfo


def peer(name: str, ip: str, *groups: str) -> PeerInfo:
    return PeerInfo(id=f"id-{name}", name=name, fqdn=f"{name}.mesh.internal", mesh_ip=ip,
                    ssh_enabled=True, groups=groups)


PEERS = [peer("web-1", "100.64.0.2", "web"), peer("web-2", "100.64.0.3", "web", "eu"),
         peer("db-1", "100.64.0.4", "db")]


@pytest.mark.parametrize(("words", "names", "problems"), [
    pytest.param(["web-1", "db-1"], ["web-1", "db-1"], [], id="names-in-order"),
    pytest.param(["group:web"], ["web-1", "web-2"], [], id="group"),
    pytest.param(["web-2", "group:web", "100.64.0.2"], ["web-2", "web-1"], [], id="each-peer-once"),
    pytest.param(["db-1.mesh.internal", "db"], ["db-1", "db"], [], id="fqdn-and-unknown-kept"),
    pytest.param(["group:nope", "db-1"], ["db-1"], ["group:nope: no peer you may reach is in group nope"],
                 id="empty-group"),
])
def test_expand_hosts(words, names, problems) -> None:
    specs, probs = expand_hosts(words, PEERS)
    assert [s.name for s in specs] == names
    assert probs == problems


def test_unknown_host_is_asked_by_name() -> None:
    specs, _ = expand_hosts(["ghost"], PEERS)
    assert specs[0].peer is None and specs[0].key == "ghost"


def test_split_hosts() -> None:
    assert split_hosts(["a,b", " c , ,d", "group:web"]) == ["a", "b", "c", "d", "group:web"]


def test_read_hosts_file() -> None:
    text = "# fleet\nweb-1\nweb-2, web-3  # two more\n\n  group:db\n"
    assert read_hosts_file(text) == ["web-1", "web-2", "web-3", "group:db"]


def test_split_lines_bounds_a_line_without_newline() -> None:
    lines, rest = split_lines(b"one\ntwo\nthr")
    assert lines == [b"one", b"two"] and rest == b"thr"
    lines, rest = split_lines(b"x" * (2 * MAX_LINE + 5))
    assert [len(x) for x in lines] == [MAX_LINE, MAX_LINE] and rest == b"x" * 5
    assert split_lines(b"tail", final=True) == ([b"tail"], b"")


def test_capture_keeps_at_most_the_limit() -> None:
    cap = Capture(limit=10)
    for chunk in (b"12345", b"67890", b"abc"):
        cap.add(chunk)
    assert bytes(cap.data) == b"1234567890" and cap.truncated
    res = HostResult(name="a", exit_status=0, stdout=cap, stderr=Capture(10))
    doc = res.to_json()
    assert doc["stdout"] == "1234567890" and doc["stdout_truncated"] and "stderr_truncated" not in doc
    assert set(doc) >= {"name", "exit_status", "stdout", "stderr", "duration", "error"}


@pytest.mark.parametrize(("results", "code"), [
    pytest.param([HostResult("a", exit_status=0), HostResult("b", exit_status=0)], 0, id="all-ok"),
    pytest.param([HostResult("a", exit_status=0), HostResult("b", exit_status=3)], 1, id="command-failed"),
    pytest.param([HostResult("a", exit_status=3), HostResult("b", error="refused")], 255, id="unreachable"),
    pytest.param([HostResult("a", exit_signal="KILL")], 1, id="signal"),
])
def test_exit_code(results, code) -> None:
    assert exit_code(results) == code


def test_summary_lists_failures_sorted() -> None:
    lines = summary_lines([HostResult("z", exit_status=2), HostResult("a", error="a: Connection refused"),
                           HostResult("m", exit_status=0)], 1.25)
    assert lines[0] == "meshssh exec: 1 of 3 peers succeeded in 1.2 s; 2 failed:"
    assert lines[1:] == ["  a: a: Connection refused", "  z: exit status 2"]


class FakeExchange:
    """Stands in for Session.ssh_tokens: records each request."""

    def __init__(self, clock, life: float = 60.0, refuse: tuple[str, ...] = ()) -> None:
        self.calls: list[list[str]] = []
        self.clock = clock
        self.life = life
        self.refuse = refuse

    def __call__(self, chunk):
        self.calls.append([k for k, _ in chunk])
        return {k: (ExchangeResult(error=f"no policy lets you reach {n}") if k in self.refuse
                    else ExchangeResult(token=f"tok-{k}-{len(self.calls)}", exp=self.clock() + self.life))
                for k, n in chunk}


def test_token_pool_one_request_for_the_set_and_refusals() -> None:
    now = [1000.0]
    fake = FakeExchange(lambda: now[0], refuse=("db",))
    pool = TokenPool(fake, clock=lambda: now[0])

    async def go():
        await pool.prime([("a", "a"), ("b", "b"), ("db", "db")])
        assert pool.refusal("db") == "no policy lets you reach db"
        assert (await pool.take("a")).token == "tok-a-1"
        with pytest.raises(AccessDenied):
            await pool.take("db")

    asyncio.run(go())
    assert fake.calls == [["a", "b", "db"]]


def test_token_pool_chunks_at_the_management_limit() -> None:
    fake = FakeExchange(lambda: 0.0)
    pool = TokenPool(fake, clock=lambda: 0.0)
    asyncio.run(pool.prime([(f"p{i}", f"p{i}") for i in range(MAX_AUDIENCES + 3)]))
    assert [len(c) for c in fake.calls] == [MAX_AUDIENCES, 3]


def test_token_pool_halves_for_an_older_management_limit() -> None:
    calls: list[int] = []

    def limited(chunk):
        calls.append(len(chunk))
        if len(chunk) > 2:
            return {k: ExchangeResult(error="management refused: at most 2 audiences per request",
                                      error_code="invalid_request") for k, _ in chunk}
        return {k: ExchangeResult(token=f"t-{k}", exp=100.0) for k, _ in chunk}

    pool = TokenPool(limited, clock=lambda: 0.0)
    asyncio.run(pool.prime([(f"p{i}", f"p{i}") for i in range(5)]))
    assert calls == [5, 2, 3, 1, 2]
    assert all(pool.refusal(f"p{i}") is None for i in range(5))


def test_token_pool_refills_stale_tokens_in_one_request() -> None:
    now = [0.0]
    fake = FakeExchange(lambda: now[0])
    pool = TokenPool(fake, clock=lambda: now[0])

    async def go():
        await pool.prime([("a", "a"), ("b", "b"), ("c", "c")])
        assert (await pool.take("a")).token == "tok-a-1"
        now[0] = 50.0  # 10 s of life left: too little to dial with
        assert (await pool.take("b")).token == "tok-b-2"
        assert (await pool.take("c")).token == "tok-c-2"

    asyncio.run(go())
    assert fake.calls == [["a", "b", "c"], ["b", "c"]]


def test_exec_usage_errors() -> None:
    runner = CliRunner()
    assert runner.invoke(exec_command, ["--hosts", "a"]).exit_code == 2
    assert runner.invoke(exec_command, ["onlyhost"]).exit_code == 2
    assert runner.invoke(exec_command, ["--hosts", ",", "true"]).exit_code == 2
    assert "--throttle" in runner.invoke(exec_command, ["--help"]).output
    with runner.isolated_filesystem():
        open("empty", "w").write("# nothing\n")
        r = runner.invoke(exec_command, ["--hosts-file", "empty", "--", "true"])
        assert r.exit_code == 2 and "names no peer" in r.output


def test_subsystem_option() -> None:
    args = parse_ssh_args(["-s", "win-1", "powershell"])
    assert args.subsystem and args.remote_command == "powershell"
    assert not want_pty(args, True)
    assert want_pty(parse_ssh_args(["-stt", "win-1", "powershell"]), False)
    with pytest.raises(UsageError):
        parse_ssh_args(["-s", "win-1"])


class _Reader:
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_pump_prefixes_lines_as_they_arrive_and_keeps_streams_apart() -> None:
    import io

    from meshssh_client.fanout import Sink, _pump

    out, err = io.BytesIO(), io.BytesIO()
    sink = Sink(as_json=False, width=6, out=out, err=err)

    async def go() -> None:
        await _pump(_Reader(b"one\ntw", b"o\nthree"), "web-1", "stdout", sink, None)
        await _pump(_Reader(b"oops\n"), "db", "stderr", sink, None)

    asyncio.run(go())
    assert out.getvalue() == b"web-1 : one\nweb-1 : two\nweb-1 : three\n"
    assert err.getvalue() == b"db    : oops\n"


def test_json_sink_writes_one_object_per_result() -> None:
    import io
    import json as _json

    from meshssh_client.fanout import Sink, _pump

    out = io.BytesIO()
    sink = Sink(as_json=True, width=5, out=out, err=io.BytesIO())
    res = HostResult("web-1", exit_status=0, stdout=Capture(100), stderr=Capture(100))
    asyncio.run(_pump(_Reader(b"a\n", b"b"), "web-1", "stdout", sink, res.stdout))
    sink.result(res)
    doc = _json.loads(out.getvalue())
    assert doc["stdout"] == "a\nb" and doc["exit_status"] == 0 and doc["error"] is None
