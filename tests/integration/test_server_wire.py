"""What `meshsshd serve` runs on and puts on the wire: the event loop meshsshd.event_loop
chose, no aiohttp in a daemon that does not need it, and a bulk download seen by the system
OpenSSH client arriving whole with no SSH_MSG_IGNORE before the data packets
(meshsshd.asyncssh_tuning), and OpenSSH's transport ping answered (meshsshd.asyncssh_ping)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import asyncssh
import pytest
from asyncssh import connection as conn_mod

from tests.support import os_user, require_root, require_tool

from .serverkit import ServerKit, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root]

SIZE = 8 << 20      # 256 packets of 32 KiB: asyncssh unpatched would send as many ignores


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_root()
    require_tool("ssh")
    tmp = tmp_path_factory.mktemp("wire")
    key = client_key(tmp)
    with os_user("msw") as user:
        install_key(user, key)
        payload = os.path.join(user.pw_dir, "payload.bin")
        with open(payload, "wb") as f:
            f.write(os.urandom(SIZE))
        os.chown(payload, user.pw_uid, user.pw_gid)
        config = {"authorized_keys": True,
                  "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity],
                              "local_users": [user.pw_name]}]}
        with ServerKit(tmp / "server", config) as srv:
            yield srv, user, key, payload


def _events(srv: ServerKit) -> dict[str, dict]:
    found = {}
    for line in srv.output().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if "event" in doc:
            found.setdefault(doc["event"], doc)
    return found


def test_daemon_runs_on_uvloop_with_the_ignore_patch(world):
    srv, *_ = world
    events = _events(srv)
    assert events["event-loop.selected"]["loop"] == "uvloop"
    assert "asyncssh-tuning.applied" in events
    assert "asyncssh-tuning.refused" not in events


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"])
def test_download_is_whole_and_has_no_ignore_packets(world, cipher):
    srv, user, key, payload = world
    with open(payload, "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    # OpenSSH logs "Received SSH2_MSG_IGNORE" at debug3 for each ignore packet it reads.
    r = srv.ssh(user.pw_name, key, "cat", payload, opts=("-o", "LogLevel=DEBUG3", "-c", cipher))
    assert r.returncode == 0, r.stderr[-2000:]
    assert hashlib.sha256(r.stdout).hexdigest() == expected
    log = r.stderr.decode(errors="replace")
    assert f"cipher: {cipher}" in log            # the debug log is there and names the cipher
    assert log.count("Received SSH2_MSG_IGNORE") == 0


def test_serve_with_file_keys_never_loads_aiohttp(world):
    """aiohttp is for management, metrics and jwks_url only (meshsshd/jwks.py imports it
    when it fetches); its C parser would show in the daemon's mappings once imported."""
    srv, user, key, _ = world
    assert srv.ssh(user.pw_name, key, "true").returncode == 0
    assert srv.proc is not None
    with open(f"/proc/{srv.proc.pid}/maps") as f:
        maps = f.read()
    assert "site-packages/cryptography/" in maps          # the check sees extension modules
    assert "site-packages/aiohttp/" not in maps


# Reads 1 MiB at a time with a pause after each, so the daemon's child-input pump fills,
# pauses the channel and resumes it again and again; prints what it got.
SLOW_READER = ("import hashlib, sys, time\n"
               "h, n = hashlib.sha256(), 0\n"
               "while chunk := sys.stdin.buffer.read(1 << 20):\n"
               "    h.update(chunk); n += len(chunk); time.sleep(0.005)\n"
               "print(n, h.hexdigest())\n")


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_upload_to_a_slow_reader_is_whole_and_bounded(world):
    """Uploads are written to the child in one write() per loop turn (session/_io.py
    FdWriter) and paused above 2 × the SSH window; a reader slower than the network must
    get every byte in order, and the daemon must not buffer the difference (before the
    flow-control fix a 2 GiB upload grew it by 390–590 MiB; bench/RESULTS.md)."""
    srv, user, key, _ = world
    assert srv.proc is not None
    data = os.urandom(16 << 20) * 16                       # 256 MiB
    with open(f"/proc/{srv.proc.pid}/clear_refs", "w") as f:
        f.write("5")                                       # reset the peak RSS (VmHWM)
    before = _peak_rss_kib(srv.proc.pid)
    r = srv.ssh(user.pw_name, key, "/usr/bin/python3", "-c", f"'{SLOW_READER}'", input=data, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]
    grown_mib = (_peak_rss_kib(srv.proc.pid) - before) / 1024
    assert grown_mib < 64, f"the daemon buffered the upload: peak RSS grew by {grown_mib:.0f} MiB"


async def _ping_over_asyncssh(port: int, user: str, key_path: str, data: bytes) -> tuple[dict, bytes, str, bool]:
    """An asyncssh client that records the server's EXT_INFO, sends a real SSH2_MSG_PING
    after authentication and waits for the PONG; (extensions, pong data, `id -un` after
    the ping, strict KEX negotiated)."""
    from asyncssh.constants import MSG_EXT_INFO
    from asyncssh.packet import SSHPacket, String

    loop = asyncio.get_running_loop()
    extensions: dict[bytes, bytes] = {}
    pong: asyncio.Future[bytes] = loop.create_future()
    table = conn_mod.SSHClientConnection._packet_handlers
    original_ext_info = table[MSG_EXT_INFO]

    def record_ext_info(self, pkttype, pktid, packet):
        payload = packet.get_remaining_payload()
        copy = SSHPacket(payload)
        for _ in range(copy.get_uint32()):
            name = copy.get_string()
            extensions[name] = copy.get_string()
        return original_ext_info(self, pkttype, pktid, SSHPacket(payload))

    def record_pong(self, pkttype, pktid, packet):
        if not pong.done():
            pong.set_result(packet.get_string())

    conn_mod.SSHClientConnection._packet_handlers = {**table, MSG_EXT_INFO: record_ext_info, 193: record_pong}
    try:
        async with asyncssh.connect("127.0.0.1", port, username=user, known_hosts=None,
                                    client_keys=[key_path], agent_path=None) as conn:
            conn.send_packet(192, String(data))
            got = await asyncio.wait_for(pong, 10)
            result = await conn.run("id -un", check=True)
            return extensions, got, result.stdout.strip(), bool(conn._strict_kex)
    finally:
        conn_mod.SSHClientConnection._packet_handlers = table


def test_ping_is_advertised_and_answered_with_strict_kex(world):
    """OpenSSH >= 9.5 obfuscates keystroke timing only with a server that lists
    ping@openssh.com in EXT_INFO and answers SSH2_MSG_PING (meshsshd.asyncssh_ping)."""
    srv, user, key, _ = world
    data = os.urandom(48)
    extensions, got, who, strict = asyncio.run(_ping_over_asyncssh(srv.port, user.pw_name, str(key.path), data))
    assert extensions.get(b"ping@openssh.com") == b"0", extensions
    assert got == data
    assert who == user.pw_name              # the connection goes on after the ping
    assert strict                           # and kex-strict was in force throughout
    assert "asyncssh-ping.applied" in _events(srv)


def test_openssh_client_sees_ping_in_ext_info(world):
    """The system `ssh -vvv` prints every EXT_INFO entry it receives (9.2 here does not
    use ping itself; from 9.5 on it does)."""
    srv, user, key, _ = world
    r = srv.ssh(user.pw_name, key, "true", opts=("-o", "LogLevel=DEBUG3"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ping@openssh.com" in r.stderr.decode(errors="replace"), r.stderr[-3000:]
