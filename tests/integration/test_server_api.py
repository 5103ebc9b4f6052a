"""MeshSSHServer used in-process, as the managed agent uses it: start, sessions(),
host_public_keys, bound_addresses, apply() with a new listen address and new rules, stop."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from meshsshd.audit import AuditEvent
from meshsshd.config import ServerSettings
from meshsshd.netmap import AccessRule
from meshsshd.server import MeshSSHServer
from tests.support import free_port, require_root

pytestmark = pytest.mark.root


class ListSink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)


async def test_embedded_server_lifecycle(tmp_path, make_user):
    require_root()
    user = make_user("msa")
    rule = AccessRule(sources=("127.0.0.0/8",), identities=("*",), local_users=(user.pw_name,))
    port1, port2 = free_port(), free_port()
    settings = ServerSettings(listen=(("127.0.0.1", port1),), state_dir=tmp_path / "state", disable_auth=True,
                              access=(rule,), local_port_forwarding=True, remote_port_forwarding=True)
    sink = ListSink()
    server = MeshSSHServer(settings, audit=sink)
    await server.start()
    try:
        assert server.bound_addresses == [("127.0.0.1", port1)]
        keys = server.host_public_keys
        assert [k.split()[0] for k in keys] == ["ssh-ed25519", "ssh-rsa"]
        assert (tmp_path / "state" / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600

        async with asyncssh.connect("127.0.0.1", port1, username=user.pw_name, known_hosts=None,
                                    client_keys=None, agent_path=None) as conn:
            proc = await conn.create_process("echo up; sleep 30")
            assert await proc.stdout.readline() == "up\n"
            live = server.sessions()
            assert len(live) == 1
            s = live[0]
            assert (s["identity"], s["source"], s["local_user"], s["kind"]) == (
                "peer:127.0.0.1", "127.0.0.1", user.pw_name, "exec")
            assert s["started"] > 0 and s["id"]

            # New listen address and rules that no longer admit this user.
            other = AccessRule(sources=("127.0.0.0/8",), identities=("*",), local_users=("nobody",))
            await server.apply(settings.with_(listen=(("127.0.0.1", port2),), access=(other,)))
            # Until its delayed disconnect, the revoked connection opens no new channel
            # (no await since apply(), so the disconnect cannot have happened yet).
            assert server.connections
            for c in server.connections:
                with pytest.raises(asyncssh.ChannelOpenError, match="access revoked"):
                    c.session_requested()
                with pytest.raises(asyncssh.ChannelOpenError, match="access revoked"):
                    c.connection_requested("127.0.0.1", 1, "127.0.0.1", 2)
                assert c.server_requested("127.0.0.1", 0) is False
            assert server.bound_addresses == [("127.0.0.1", port2)]
            await asyncio.wait_for(proc.wait_closed(), 5)
            stderr = await proc.stderr.read()
            assert "access revoked" in stderr
        await asyncio.sleep(0.3)
        assert server.sessions() == []
        types = [e.type for e in sink.events]
        assert "session.started" in types and "session.revoked" in types and "session.ended" in types
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port1), 2)
        # Host keys are reused by a second server on the same state dir.
        again = MeshSSHServer(settings.with_(listen=(("127.0.0.1", 0),)))
        await again.start()
        assert again.host_public_keys == keys
        await again.stop()
    finally:
        await server.stop()


async def test_signal_request_reaches_the_whole_process_group(tmp_path, make_user):
    require_root()
    user = make_user("msa")
    rule = AccessRule(sources=("127.0.0.0/8",), identities=("*",), local_users=(user.pw_name,))
    port = free_port()
    server = MeshSSHServer(ServerSettings(listen=(("127.0.0.1", port),), state_dir=tmp_path / "state",
                                          disable_auth=True, access=(rule,)))
    await server.start()
    try:
        async with asyncssh.connect("127.0.0.1", port, username=user.pw_name, known_hosts=None,
                                    client_keys=None, agent_path=None) as conn:
            proc = await conn.create_process("sleep 1001 & echo started; wait")
            assert await proc.stdout.readline() == "started\n"
            proc.send_signal("TERM")
            result = await asyncio.wait_for(proc.wait(), 10)
            assert result.exit_signal is not None and result.exit_signal[0] == "TERM"
        pgrep = await asyncio.create_subprocess_exec("pgrep", "-u", str(user.pw_uid), "-f", "sleep 1001",
                                                     stdout=asyncio.subprocess.PIPE)
        out, _ = await pgrep.communicate()
        assert out == b""   # the background sleep got the signal too
    finally:
        await server.stop()
