"""meshsshd.dataplane._exec.run on the daemon's loop (uvloop): a tool that daemonises
(like wireguard-go) must not keep run() waiting for its pipes."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import uvloop

from meshsshd.dataplane._exec import run
from meshsshd.errors import DataplaneError

# Starts a background child with its stdio on /dev/null, as a daemonising tool does, and
# prints its pid. Only fds leaked beyond 0-2 could keep the pipes open after `sh` exits.
DAEMONISE = "sleep 60 </dev/null >/dev/null 2>&1 & echo $!"


def _on_uvloop(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def test_a_daemonising_command_returns_on_uvloop():
    result = _on_uvloop(run(["sh", "-c", DAEMONISE], timeout=10))
    os.kill(int(result.stdout), signal.SIGKILL)
    assert result.returncode == 0


def test_input_output_and_failures():
    assert _on_uvloop(run(["cat"], stdin="hello")).stdout == "hello"
    with pytest.raises(DataplaneError, match="is not installed"):
        _on_uvloop(run(["meshsshd-no-such-tool"]))
    with pytest.raises(DataplaneError, match=r"failed \(exit 3\): oops"):
        _on_uvloop(run(["sh", "-c", "echo oops >&2; exit 3"]))
    assert _on_uvloop(run(["sh", "-c", "exit 3"], check=False)).returncode == 3
