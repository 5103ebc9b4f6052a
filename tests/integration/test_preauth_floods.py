"""Pre-authentication floods must not shut real users out (MaxStartups fairness).

Each case holds one flood shape against a real `meshsshd serve` for a bounded time
while a real OpenSSH client logs in once a second; at least 95 % of those logins must
complete within 2 s. The shapes are the ones that locked users out before:

- `userauth-stall`: 100 clients that finish key exchange and then never answer at
  user authentication (reconnecting when dropped);
- `churn-200` / `churn-600`: new connections that only send their identification
  string, at 200 and 600 per second;
- `idle-500`: 500 TCP connections that send nothing (reopened when closed).

Each shape runs from other loopback addresses (127.0.0.2-4, with
`per_source_max_startups = 20` holding the flood to its own slots) and from the real client's own address 127.0.0.1
(where only eviction of the stalest connection can keep the door open).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable

import asyncssh
import pytest

from tests.support import require_root

from .serverkit import ServerKit, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root]

FLOOD_SECONDS = 4.0   # four real logins per shape: 95 % means all of them
LOGIN_DEADLINE = 2.0
OTHER_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
SAME_SOURCE = ("127.0.0.1",)


class _StallAtUserauth(asyncssh.SSHClient):
    """A client that completes key exchange, then never sends an authentication request."""

    async def public_key_auth_requested(self) -> None:
        await asyncio.sleep(3600)


async def _reconnecting(stop: asyncio.Event, once: Callable[[], Awaitable[None]]) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            await once()
        await asyncio.sleep(0.01)


async def _stall_userauth(port: int, sources: tuple[str, ...], stop: asyncio.Event) -> None:
    async def one(source: str) -> None:
        await asyncssh.connect("127.0.0.1", port, local_addr=(source, 0), username="flood", known_hosts=None,
                               client_keys=None, agent_path=None, password=None, preferred_auth="publickey",
                               client_factory=_StallAtUserauth, login_timeout=3600)
    await asyncio.gather(*(_reconnecting(stop, lambda s=sources[i % len(sources)]: one(s)) for i in range(100)))


async def _hold(port: int, source: str, hello: bytes, hold: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        if hello:
            writer.write(hello)
        with contextlib.suppress(asyncio.TimeoutError):
            while await asyncio.wait_for(reader.read(4096), hold):
                pass
    finally:
        writer.transport.abort()


async def _idle(port: int, sources: tuple[str, ...], stop: asyncio.Event) -> None:
    await asyncio.gather(*(_reconnecting(stop, lambda s=sources[i % len(sources)]: _hold(port, s, b"", 3600))
                           for i in range(500)))


async def _churn(port: int, sources: tuple[str, ...], stop: asyncio.Event, rate: int) -> None:
    """`rate` new hello-only connections a second, each held up to 2 s (at most 800 open)."""
    tasks: set[asyncio.Task] = set()
    tick, started, n = 0.01, time.monotonic(), 0
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate)
        while n < due:
            if len(tasks) < 800:
                task = asyncio.ensure_future(_hold(port, sources[n % len(sources)], b"SSH-2.0-flood\r\n", 2.0))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), t.cancelled() or t.exception()))
            n += 1
        await asyncio.sleep(tick)
    for task in tasks:
        task.cancel()


SHAPES = {
    "userauth-stall": _stall_userauth,
    "churn-200": lambda port, sources, stop: _churn(port, sources, stop, 200),
    "churn-600": lambda port, sources, stop: _churn(port, sources, stop, 600),
    "idle-500": _idle,
}


class Flood:
    """Runs one flood shape on its own event loop in a thread, stopped on exit."""

    def __init__(self, shape: str, port: int, sources: tuple[str, ...]) -> None:
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._run = SHAPES[shape](port, sources, self._stop)
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        task = self._loop.create_task(self._run)
        stopped = self._loop.create_task(self._stop.wait())   # idle sockets never look at it
        self._loop.run_until_complete(asyncio.wait([task, stopped], timeout=FLOOD_SECONDS + 30,
                                                   return_when=asyncio.FIRST_COMPLETED))
        pending = asyncio.all_tasks(self._loop)
        for t in pending:
            t.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


def real_logins(srv: ServerKit, user: str, key, seconds: float) -> list[float | None]:
    """One OpenSSH login a second for `seconds`: each one's duration, None when it failed."""
    results: list[float | None] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            r = srv.ssh(user, key, "true", opts=["-o", "BindAddress=127.0.0.1", "-o", "ConnectTimeout=5"],
                        timeout=10)
            ok = r.returncode == 0
            if not ok:
                print("login failed:", r.returncode, r.stderr.decode(errors="replace").strip()[-400:])
        except subprocess.TimeoutExpired:
            ok = False
        elapsed = time.monotonic() - t0
        results.append(elapsed if ok else None)
        time.sleep(max(0.0, 1.0 - elapsed))
    return results


@pytest.mark.parametrize("sources", [pytest.param(OTHER_SOURCES, id="other-sources"),
                                     pytest.param(SAME_SOURCE, id="same-source")])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_real_logins_get_through_a_preauth_flood(tmp_path, make_user, shape, sources):
    require_root()
    key = client_key(tmp_path)
    user = make_user("msf")
    install_key(user, key)
    rule = {"sources": ["127.0.0.0/8"], "identities": [key.identity], "local_users": [user.pw_name]}
    config = {"authorized_keys": True, "access": [rule]}
    if sources != SAME_SOURCE:   # the flood's addresses are held to 20 slots each
        config["limits"] = {"per_source_max_startups": 20}
    with ServerKit(tmp_path / "srv", config, log_level="warning") as srv:
        with Flood(shape, srv.port, sources):
            time.sleep(0.7)   # let the flood fill the slots first
            results = real_logins(srv, user.pw_name, key, FLOOD_SECONDS)
        fast = [t for t in results if t is not None and t < LOGIN_DEADLINE]
        print(f"{shape} from {','.join(sources)}: {len(fast)}/{len(results)} logins within {LOGIN_DEADLINE}s; "
              f"durations {[None if t is None else round(t, 2) for t in results]}")
        assert len(fast) >= 0.95 * len(results), results
        assert srv.ssh(user.pw_name, key, "true", timeout=15).returncode == 0   # still serving after the flood
