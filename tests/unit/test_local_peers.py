"""meshssh finds its own peer's mesh address on this machine: the pointers `meshsshd up`
leaves, the status files they point at, live daemons only, the destination left out."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from meshssh_client.target import choose_source_address, own_peers, source_hint
from meshsshd import local_peers
from meshsshd.state import StateDir

MGMT = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def pointers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "run"
    monkeypatch.setattr(local_peers, "ROOT_POINTERS", where)
    monkeypatch.setattr(local_peers, "DEFAULT_STATE_DIR", tmp_path / "no-default")
    monkeypatch.setattr(local_peers.os, "geteuid", lambda: 0)
    return where


def peer(tmp_path: Path, name: str, ip: str, *, pid: int | None = None, mgmt: str = MGMT) -> Path:
    state = StateDir(tmp_path / name)
    state.ensure()
    state.status_path.write_text(json.dumps({"name": name, "mesh_ip": ip, "management_url": mgmt,
                                             "pid": os.getpid() if pid is None else pid}))
    pointer = local_peers.publish(state)
    assert pointer is not None
    return pointer


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_one_other_live_peer_of_this_mesh_is_the_source(tmp_path: Path) -> None:
    peer(tmp_path, "laptop", "127.77.0.2")
    peer(tmp_path, "server-1", "127.77.0.3")
    peer(tmp_path, "elsewhere", "127.88.0.2", mgmt="http://127.0.0.1:10")
    env: dict[str, str] = {}
    assert {p.name for p in own_peers(MGMT, env)} == {"laptop", "server-1"}
    # Dialling server-1 from this machine: laptop is where we sit.
    assert choose_source_address(None, MGMT, env, exclude="127.77.0.3") == "127.77.0.2"
    # Two candidates and no way to tell: the system chooses, and a refusal says how to pick.
    assert choose_source_address(None, MGMT, env, exclude="127.77.0.9") is None
    hint = source_hint(None, MGMT, env)
    assert "-b ADDRESS, MESHSSH_SOURCE_ADDRESS" in hint and "laptop 127.77.0.2" in hint
    assert "server-1 127.77.0.3" in hint and "elsewhere" not in hint
    # Anything the user says wins.
    assert choose_source_address("127.77.0.5", MGMT, env, exclude="127.77.0.3") == "127.77.0.5"
    assert choose_source_address(None, MGMT, {"MESHSSH_SOURCE_ADDRESS": "127.77.0.6"}) == "127.77.0.6"


def test_dead_daemons_and_their_pointers_do_not_count(tmp_path: Path, pointers: Path) -> None:
    stale = peer(tmp_path, "crashed", "127.77.0.4", pid=dead_pid())
    stale.write_text(json.dumps({"state_dir": str(tmp_path / "crashed"), "pid": dead_pid()}))
    assert own_peers(MGMT, {}) == []
    peer(tmp_path, "laptop", "127.77.0.2")   # the next `up` prunes the dead one's pointer
    assert not stale.exists()
    assert choose_source_address(None, MGMT, {}) == "127.77.0.2"


def test_withdraw_removes_only_our_own_pointer(tmp_path: Path) -> None:
    pointer = peer(tmp_path, "laptop", "127.77.0.2")
    pointer.write_text(json.dumps({"state_dir": str(tmp_path / "laptop"), "pid": 1}))  # a later `up`
    local_peers.withdraw(pointer)
    assert pointer.exists()
    pointer.write_text(json.dumps({"state_dir": str(tmp_path / "laptop"), "pid": os.getpid()}))
    local_peers.withdraw(pointer)
    assert not pointer.exists()


def test_a_named_status_file_is_the_only_candidate(tmp_path: Path) -> None:
    peer(tmp_path, "laptop", "127.77.0.2")
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"name": "x", "mesh_ip": "127.77.0.8", "management_url": MGMT, "pid": None}))
    assert choose_source_address(None, MGMT, {"MESHSSHD_STATUS_FILE": str(named)}) == "127.77.0.8"
    assert choose_source_address(None, "http://other", {"MESHSSHD_STATUS_FILE": str(named)}) is None
