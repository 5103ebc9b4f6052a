"""README's "Using it for real" works as printed: from `meshmgmt init` to Alice's SSH
logins with `meshssh` and native `ssh`/`scp`/`sftp`, and a server leaving the mesh.

The commands are read from README itself (the sh blocks under that heading), so a step
missing there fails here. What lets them run on one machine is this list, applied to the
text of each command and to nothing else:

- the example addresses and paths become loopback ones and temp dirs (`example_to_local`);
- `meshmgmt serve` gets a loopback mesh network and each `meshsshd up` `--dataplane none`
  with its own `--hostname` and `--state-dir` (single-machine mode: two peers, one host);
- `mk_…` is the setup key the line's comment names (`# servers key`), as printed by
  `setup-keys create` a block earlier;
- commands that run until stopped (`serve`, `up`) run in the background until the end;
  `meshssh login`'s device code is approved by scripts/demo_browser.py, as the person at
  the browser would;
- `alice` is a throwaway OS user, and Alice's block (the one that logs in) runs as her,
  in her home: her login, control master and ~/.ssh/config are hers, as on her laptop.
  The admin's and the servers' blocks run as root. The peers' state directories are in
  a world-readable temp dir, as /var/lib/meshsshd is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import REPO, as_user, free_port, os_user, require_root, require_tool, stop_group

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SECTION = "## Using it for real"
USER_PASSWORD = "initial password"   # what README's `users create` line sets
KEY_LINE = re.compile(r"setup key \(shown once\): (\S+)")


def readme_commands() -> list[tuple[int, str, str]]:
    """(block number, command, trailing comment) for each command of the section."""
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    out = []
    for number, block in enumerate(re.findall(r"```sh\n(.*?)```", section, re.S)):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            command, _, comment = line.partition("  #")
            out.append((number, " ".join(command.split()), comment.strip(" #")))
    return out


@dataclass
class Run:
    root: Path
    user: str
    peer_root: Path
    user_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    background: list[subprocess.Popen] = field(default_factory=list)
    peers: dict[str, subprocess.Popen] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state_dir(self, peer: str) -> Path:
        return self.peer_root / peer

    def example_to_local(self, command: str) -> str:
        command = command.replace("https://mesh.example.com", self.url)
        command = command.replace("0.0.0.0:8080", f"127.0.0.1:{self.port}")
        command = command.replace("/var/lib/meshmgmt", str(self.root / "meshmgmt"))
        command = re.sub(r"\balice\b", self.user, command)
        return command

    @property
    def home(self) -> Path:
        return Path(self.user_env["HOME"])

    def _argv(self, command: str, alice: bool) -> tuple[list[str], dict[str, str], Path]:
        if alice:
            return as_user(self.user, ["bash", "-c", command]), self.user_env, self.home
        return ["bash", "-c", command], self.env, self.root

    def sh(self, command: str, alice: bool = False, **kwargs: object) -> subprocess.CompletedProcess[str]:
        argv, env, cwd = self._argv(command, alice)
        res = subprocess.run(argv, env=env, cwd=cwd, text=True, capture_output=True, timeout=120,
                             **kwargs)  # type: ignore[call-overload]
        assert res.returncode == 0, f"README's `{command}` failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        return res

    def start(self, command: str, log: str, alice: bool = False) -> subprocess.Popen:
        argv, env, cwd = self._argv(f"exec {command}", alice)
        out = open(self.root / f"{log}.log", "w")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.background.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


def wait_for(what: str, check, timeout: float = 60.0, logs: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def peer_status(run: Run, peer: str) -> dict:
    return json.loads((run.state_dir(peer) / "status.json").read_text())


def run_command(run: Run, block: int, command: str, comment: str, block_peer: dict[int, str],
                alice: bool) -> None:
    local = run.example_to_local(command)
    argv = shlex.split(local)
    if argv[0] == "export":
        run.env.update(dict(a.split("=", 1) for a in argv[1:]))
    elif argv[:2] == ["meshmgmt", "init"]:
        run.sh(local, input="an admin password for the readme test\n")
    elif argv[:2] == ["meshmgmt", "serve"]:
        net = f"127.{100 + os.getpid() % 100}.0.0/16"
        run.start(f"{local} --network {net}", "mgmt")
        wait_for("meshmgmt serve", lambda: urllib.request.urlopen(run.url + "/healthz", timeout=2).status == 200,
                 logs=run.log("mgmt"))
    elif argv[:2] == ["meshsshd", "up"]:
        peer = "db-1" if "--allow-server-ssh" in argv else "laptop"
        key = run.keys[comment.split()[0]]   # "# servers key"
        block_peer[block] = peer
        run.peers[peer] = run.start(local.replace("mk_…", key) + f" --dataplane none --hostname {peer} "
                                    f"--state-dir {run.state_dir(peer)}", peer)
        wait_for(f"{peer} on the mesh", lambda: peer_status(run, peer)["mesh_ip"], logs=run.log(peer))
        if peer == "laptop":   # as a person would wait a moment: db-1 learns about laptop
            wait_for("db-1 knowing laptop", lambda: any(
                p["name"] == "laptop" for p in peer_status(run, "db-1")["peers"]), logs=run.log("db-1"))
    elif argv[:2] == ["meshssh", "login"]:
        login = run.start(local + " --no-browser", "login", alice=alice)
        wait_for("the device code", lambda: "user_code=" in run.log("login"))
        url = re.search(r"http\S*user_code=[A-Z-]+", run.log("login"))
        assert url, run.log("login")
        secret = run.root / "user.password"
        secret.write_text(USER_PASSWORD)
        browser = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_browser.py"), url.group(0),
                                  f"{run.user}@example.com", str(secret)], capture_output=True, text=True,
                                 timeout=60)
        assert browser.returncode == 0, browser.stdout + browser.stderr + run.log("mgmt")[-3000:]
        assert login.wait(60) == 0, run.log("login")
    else:
        if argv[0] == "meshsshd":   # status / down: the block's peer, else the server
            run.env["MESHSSHD_STATE_DIR"] = str(run.state_dir(block_peer.get(block, "db-1")))
        res = run.sh(local, alice=alice)
        run.outputs[command] = res.stdout + res.stderr
        if match := KEY_LINE.search(res.stdout):
            run.keys[argv[argv.index("--name") + 1]] = match.group(1)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    require_root()
    for tool in ("ssh", "scp", "sftp", "runuser", "unshare"):
        require_tool(tool)
    peer_root = Path(tempfile.mkdtemp(prefix="meshsshd-readme-", dir="/var/tmp"))
    peer_root.chmod(0o755)
    with os_user("rdm") as pw:
        r = Run(tmp_path, pw.pw_name, peer_root)
        path = f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"
        r.env = {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8"}
        r.user_env = {"PATH": path, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
                      "LANG": "C.UTF-8"}
        r.sh("mkdir site && echo '<h1>hello</h1>' > site/index.html && echo '%PDF-1.4 readme' > report.pdf",
             alice=True)
        try:
            yield r
        finally:
            subprocess.run(as_user(r.user, ["meshssh", "control", "stop"]), env=r.user_env,
                           capture_output=True, timeout=30)
            for proc in reversed(r.background):
                stop_group(proc, signal.SIGTERM, timeout=20)
            shutil.rmtree(peer_root, ignore_errors=True)


def test_readme_real_use_path_works_as_printed(run: Run) -> None:
    commands = readme_commands()
    assert len(commands) >= 15, commands   # the section's blocks were found
    alice_block = next(b for b, c, _ in commands if c.startswith("meshssh login"))
    block_peer: dict[int, str] = {}
    for block, command, comment in commands:
        run_command(run, block, command, comment, block_peer, alice=block == alice_block)
    out = run.outputs
    home = run.home
    assert "db-1" in out["meshssh peers"], out["meshssh peers"]
    assert "load average" in out["meshssh alice@db-1 uptime"]
    assert "load average" in out["ssh alice@db-1 uptime"]
    assert (home / "www" / "index.html").read_text() == "<h1>hello</h1>\n"
    assert (home / "www").stat().st_uid == (home / "site").stat().st_uid   # written as Alice
    # scp copied ~/report.pdf onto itself on db-1 (the same home here); sftp lists it.
    assert "report.pdf" in out["scp report.pdf db-1: && sftp db-1 <<< ls"]
    # `meshsshd down` stopped the server peer.
    assert run.peers["db-1"].wait(30) is not None
    assert peer_status(run, "db-1")["pid"] is None
