"""Exit status reaches clients that close a channel once EOF went both ways.

PuTTY's plink, dropbear's dbclient and an OpenSSH ControlMaster close the channel as soon
as they have seen EOF in both directions; a server that sends EOF before exit-status
loses the status to them. The command closes its output early, the worst case.
EXIT_STATUS_RUNS=40 runs each client 40 times (10 by default); a failure lists the codes lost.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import require_root, require_tool

from .serverkit import SSH_BASE_OPTS, ServerKit, key_login_config

pytestmark = [pytest.mark.openssh, pytest.mark.root]

EARLY_CLOSE = "exec >&- 2>&-; sleep 0.3; exit 3"
RUNS = int(os.environ.get("EXIT_STATUS_RUNS", "10"))

Runner = Callable[[str], int]


def _host_fingerprints(srv: ServerKit) -> list[str]:
    out = []
    for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
        r = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(srv.state_dir / name)],
                           check=True, capture_output=True, text=True)
        out.append(r.stdout.split()[1])
    return out


def plink_runner(srv: ServerKit, user: str, key: Path, work: Path) -> Runner:
    ppk = work / "key.ppk"
    subprocess.run([require_tool("puttygen"), str(key), "-O", "private", "-o", str(ppk)], check=True,
                   capture_output=True)
    hostkeys = [arg for fp in _host_fingerprints(srv) for arg in ("-hostkey", fp)]
    argv = [require_tool("plink"), "-ssh", "-batch", "-P", str(srv.port), "-i", str(ppk), *hostkeys,
            f"{user}@{srv.host}"]
    env = {**os.environ, "HOME": str(work)}
    return lambda command: subprocess.run([*argv, command], env=env, capture_output=True, timeout=30).returncode


def dbclient_runner(srv: ServerKit, user: str, key: Path, work: Path) -> Runner:
    db_key = work / "key.dropbear"
    subprocess.run([require_tool("dropbearconvert"), "openssh", "dropbear", str(key), str(db_key)], check=True,
                   capture_output=True)
    argv = [require_tool("dbclient"), "-y", "-i", str(db_key), "-p", str(srv.port), f"{user}@{srv.host}"]
    env = {**os.environ, "HOME": str(work)}
    return lambda command: subprocess.run([*argv, command], env=env, capture_output=True, timeout=30).returncode


def control_master_runner(srv: ServerKit, user: str, key: Path, work: Path) -> Runner:
    """Every run through one master connection, as Ansible's ControlPersist does."""
    opts = ["-o", "ControlMaster=auto", "-o", f"ControlPath={work}/cm-%C", "-o", "ControlPersist=60",
            "-i", str(key), "-o", "IdentitiesOnly=yes"]
    return lambda command: srv.ssh(user, None, command, opts=opts, timeout=30).returncode


def lost(runner: Runner, runs: int, command: str = EARLY_CLOSE, expected: int = 3) -> list[int]:
    """The exit codes of the runs that did not report `expected`."""
    codes = [runner(command) for _ in range(runs)]
    return [c for c in codes if c != expected]


@pytest.fixture
def server(tmp_path, make_user):
    require_root()
    user = make_user("mse")
    key, config = key_login_config(tmp_path, user)
    with ServerKit(tmp_path / "srv", config, log_level="warning") as srv:
        yield srv, user.pw_name, key.path


@pytest.mark.parametrize("make_runner", [control_master_runner, plink_runner,
                                         dbclient_runner],
                         ids=["openssh-controlmaster", "plink", "dbclient"])
def test_exit_status_survives_early_eof(server, make_runner):
    srv, user, key = server
    work = Path(tempfile.mkdtemp(prefix="mse-", dir="/tmp"))   # short: the ControlPath is a socket
    try:
        runner = make_runner(srv, user, key, work)
        assert runner("exit 3") == 3, srv.output()[-3000:]
        codes = lost(runner, RUNS)
        assert not codes, f"exit status lost in {len(codes)} of {RUNS} runs: {codes}"
    finally:
        if make_runner is control_master_runner:
            subprocess.run(["ssh", *SSH_BASE_OPTS, "-o", f"ControlPath={work}/cm-%C", "-p", str(srv.port),
                            "-O", "exit", f"{user}@{srv.host}"], capture_output=True, timeout=10)
        shutil.rmtree(work, ignore_errors=True)
