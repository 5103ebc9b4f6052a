"""A `meshssh` front hands its stdin/stdout/stderr and its environment to the control
master; it must check who listens on the socket first (client/control.py), as the master
checks its callers. Real processes: a listener running as another OS user, the real
`meshssh` front as root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import console_script, os_user, require, require_root

pytestmark = [pytest.mark.root]

# Accepts one connection, records what arrived (message bytes, descriptors), says
# "fallback" so that a front that did talk to it runs in-process.
LISTENER = r"""
import json, socket, sys
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1]); srv.listen(1)
print("ready", flush=True)
c, _ = srv.accept()
c.settimeout(10)
try:
    data, fds, _f, _a = socket.recv_fds(c, 65536, 3)
except OSError:
    data, fds = b"", []
try:
    c.sendall(b'{"fallback":"test"}\n')
except OSError:
    pass
with open(sys.argv[2], "w") as f:
    json.dump({"bytes": len(data), "fds": len(fds), "environ": b"environ" in data}, f)
"""


def _stdlib_python() -> str:
    """An interpreter another user may run (the venv's may live under /root)."""
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    require(python is not None, "no system python3 for the other user's listener")
    assert python is not None
    return python


def test_front_refuses_a_master_socket_of_another_user(tmp_path: Path) -> None:
    require_root()
    cfg = tmp_path / "cfg"
    cfg.mkdir(mode=0o700)
    (cfg / "login.json").write_text("{}")  # the front only talks to a master when logged in
    base = Path(tempfile.mkdtemp(prefix="msctl-", dir="/tmp"))  # pytest's tmp is root's only
    os.chmod(base, 0o711)
    with os_user("msctl") as user:
        spot = base / "theirs"
        spot.mkdir()
        os.chown(spot, user.pw_uid, user.pw_gid)
        record = spot / "record.json"
        listener = subprocess.Popen([_stdlib_python(), "-c", LISTENER, str(spot / "s.sock"), str(record)],
                                    user=user.pw_uid, group=user.pw_gid, stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            os.rename(spot / "s.sock", cfg / "control.sock")  # where our front looks for its master
            env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
            env.update(MESHSSH_CONFIG_DIR=str(cfg), MESHSSH_SECRET_MARKER="do-not-leak")
            r = subprocess.run([console_script("meshssh"), "db-1", "true"], capture_output=True, text=True,
                               timeout=60, env=env, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while not record.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            got = json.loads(record.read_text())
            assert got == {"bytes": 0, "fds": 0, "environ": False}, got
            assert "not using the control master" in r.stderr and f"served by uid {user.pw_uid}" in r.stderr, \
                r.stderr
        finally:
            listener.kill()
            listener.wait()
            shutil.rmtree(base, ignore_errors=True)
