"""asyncssh client load, run as a separate process so the harness never shares a loop
(or a GIL) with it:

    python -m bench.clients pool   --host H --port P --user U --key K
        holds idle authenticated connections, each with one open session channel and
        no request on it (no shell, no command: nothing runs as the user). Reads
        commands on stdin: "grow N" (reach N connections, answer "ok N"), "quit".
    python -m bench.clients logins --host H --port P --user U --key K --concurrency 50 --seconds 10
        each worker loops connect + key auth + exec `true` + close; prints one JSON line
        {"ok": n, "failed": n, "elapsed": s, "latencies": [...]} at the end.

Key exchange is pinned to curve25519-sha256 and the host key algorithm to ssh-ed25519 by
default so both servers do the same work (sshd 9.2 lacks ML-KEM, so asyncssh would pick
mlkem768x25519 with meshsshd only; and asyncssh's client prefers RSA host keys, which
sshd here does not have: meshsshd would sign with RSA-3072, sshd with ed25519).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import asyncssh


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = dict(
        port=args.port, username=args.user, client_keys=[args.key], known_hosts=None,
        agent_path=None, password=None, kbdint_auth=False, preferred_auth="publickey",
        login_timeout=60, connect_timeout=60, config=None,
    )
    if args.kex:
        opts["kex_algs"] = [args.kex]
    if args.host_key_alg:
        # asyncssh's client prefers rsa-sha2-* over ssh-ed25519 when it has no known_hosts;
        # sshd here has only an ed25519 host key, so pin it for the same signing work.
        opts["server_host_key_algs"] = [args.host_key_alg]
    return opts


async def _open_bare_session(conn: asyncssh.SSHClientConnection) -> Any:
    """Open a session channel and send no request on it: an idle session.

    asyncssh's public API always follows the open with a shell/exec request, which
    would start a user process on both servers and measure bash instead of the daemon.
    The channel class and its `_open` are asyncssh internals (2.24.x); this is bench
    code, never product code.
    """
    loop = asyncio.get_running_loop()
    chan = asyncssh.SSHClientChannel(conn, loop, "strict", None, "strict", 2 * 1024 * 1024, 32768)
    await chan._open(b"session")
    return chan


async def _pool(args: argparse.Namespace) -> None:
    opts = _options(args)
    conns: list[tuple[asyncssh.SSHClientConnection, Any]] = []
    sem = asyncio.Semaphore(args.parallel)

    async def one() -> None:
        async with sem:
            conn = await asyncssh.connect(args.host, **opts)
            chan = await _open_bare_session(conn)
            conns.append((conn, chan))

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        if line[0] == "grow":
            want = int(line[1])
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(one() for _ in range(want - len(conns))), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            # Let every server settle (post-auth allocations, keepalive timers).
            await asyncio.sleep(args.settle)
            alive = sum(1 for c, _ in conns if not c.is_closed())
            print(json.dumps({
                "held": alive, "wanted": want, "errors": len(errors),
                "first_error": repr(errors[0]) if errors else None,
                "seconds": round(time.perf_counter() - t0, 3),
            }), flush=True)
    for conn, _ in conns:
        conn.close()
    await asyncio.gather(*(c.wait_closed() for c, _ in conns), return_exceptions=True)


async def _logins(args: argparse.Namespace) -> None:
    opts = _options(args)
    ok = failed = 0
    latencies: list[float] = []
    first_error: str | None = None
    t_start = time.perf_counter()
    deadline = t_start + args.seconds

    async def worker() -> None:
        nonlocal ok, failed, first_error
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                async with asyncssh.connect(args.host, **opts) as conn:
                    result = await conn.run("true", check=True)
                    del result
                ok += 1
                latencies.append(time.perf_counter() - t0)
            except (OSError, asyncssh.Error) as exc:
                failed += 1
                first_error = first_error or repr(exc)
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - t_start
    print(json.dumps({
        "ok": ok, "failed": failed, "elapsed": elapsed, "first_error": first_error,
        "latencies": latencies,
    }), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.clients")
    p.add_argument("mode", choices=("pool", "logins"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--kex", default="curve25519-sha256", help="'' for asyncssh's default order")
    p.add_argument("--host-key-alg", default="ssh-ed25519", help="'' for asyncssh's default order")
    p.add_argument("--parallel", type=int, default=20, help="pool: connections opened at once")
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    asyncio.run(_pool(args) if args.mode == "pool" else _logins(args))


if __name__ == "__main__":
    main()
