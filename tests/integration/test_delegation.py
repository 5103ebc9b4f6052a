"""Second hop without handing over credentials: `meshssh -A --delegate-to C B -- meshssh C`.

Real processes: `meshmgmt serve`, four single-machine peers (`meshsshd up --dataplane
none`) — hop-a (where the user is logged in; this test process binds to its mesh IP),
hop-b (the first hop), hop-c and hop-d (second hops) — and the user logged in through
the device flow's form. Policies are set up explicitly so that the second hop's source
peer, hop-b, is an allowed *source* for hop-c and hop-d (peers check the source address).

Checked: delegation allowed (id -un on C through B), refused for a peer not on the list
and for bare -A, with the message on B and the notice on A; B never gets a login or a
token cache; C's audit event at management records the identity and `via` = B; and the
ssh-agent pass-through beside the broker (-A) and its absence without -A. Plain
OpenSSH `ssh -A` through the drop-in is tested in test_client_e2e.py
(test_openssh_agent_forwarding).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.meshkit import Mesh
from tests.support import console_script, require, require_root, require_tool

pytestmark = [pytest.mark.root]

ALICE = ("alice@example.com", "alice-password-1")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class World:
    mesh: Mesh
    cfg: Path
    user: str
    home: Path
    ids: dict[str, str]
    ips: dict[str, str]

    def on_a(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        """meshssh on "A": this process, logged in, bound to hop-a's mesh IP."""
        return self.mesh.meshssh(self.cfg, *args, source_peer="hop-a",
                                 MESHSSH_SOURCE_ADDRESS=self.ips["hop-a"], **env)

    launcher: Path

    def second_hop(self, target: str, command: str = "id -un") -> str:
        """The command line B's shell runs: meshssh with B's own status file (B's mesh IP)."""
        status = self.mesh.peer_dirs["hop-b"] / "status.json"
        return f"MESHSSHD_STATUS_FILE={status} {self.launcher} {self.user}@{target} {command}"

    def events(self, peer: str, type_: str) -> list[dict]:
        return self.mesh.api("GET", f"/api/events?peer_id={self.ids[peer]}&type={type_}&limit=1000")["events"]


def _others_may_run(path: str) -> bool:
    """Whether a non-root user can execute `path` (every directory on the way searchable)."""
    p = Path(os.path.realpath(path))
    if not os.stat(p).st_mode & 0o001:
        return False
    return all(os.stat(d).st_mode & 0o001 for d in p.parents)


def write_user_launcher(directory: Path) -> Path:
    """`meshssh` for the unprivileged user on B. The venv's interpreter may sit under
    /root (pyenv), which other users cannot enter; then use the system's python3 of the
    same version with the venv's packages and the project's packages on its path: links
    under their installed names (`meshssh_client` is the folder client/), since PYTHONPATH
    does not run the editable install's finder, and `-m meshssh_client.mux_master` children
    inherit PYTHONPATH."""
    script = console_script("meshssh")
    if _others_may_run(sys.executable):
        return Path(script)
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    require_tool("python3")
    assert python is not None
    out = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    require(out.stdout.strip() == str(tuple(sys.version_info[:2])),
            f"no python{sys.version_info[0]}.{sys.version_info[1]} that other users may run")
    paths = ":".join(p for p in sys.path if "/site-packages" in p and os.path.isdir(p))
    packages = directory / "packages"
    packages.mkdir()
    for name, folder in (("meshsshd", "meshsshd"), ("meshssh_client", "client"), ("meshmgmt", "management")):
        (packages / name).symlink_to(ROOT / folder)
    launcher = directory / "meshssh"
    launcher.write_text(f"#!/bin/sh\nPYTHONPATH={packages}:{paths} exec {python} -c "
                        "'import sys; sys.argv[0] = \"meshssh\"; from meshssh_client.cli import main; main()' \"$@\"\n")
    launcher.chmod(0o755)
    return launcher


@pytest.fixture(scope="module")
def world(session_user) -> Iterator[World]:
    require_root()
    # B's shell runs as the test user and reads B's status.json (0644 in a 0755 state
    # dir), so the mesh lives in a directory that user may traverse (pytest's is 0700).
    base = Path(tempfile.mkdtemp(prefix="meshdeleg-", dir="/tmp"))
    os.chmod(base, 0o711)
    mesh = Mesh(base).start()
    try:
        mesh.add_user(*ALICE)
        for g, users in (("devs", [ALICE[0]]), ("laptops", []), ("hops", []), ("dbs", []), ("others", []),
                         ("direct", [])):
            mesh.add_group(g, users)
        # A → B; and B (not A) → C, D: the second hop comes from B's mesh IP.
        mesh.add_ssh_policy("to-hops", ["devs", "laptops"], ["hops"])
        mesh.add_ssh_policy("hops-to-dbs", ["devs", "hops"], ["dbs", "others"])
        # hop-e: reachable by alice from A only — B is not a source of it.
        mesh.add_ssh_policy("direct", ["devs", "laptops"], ["direct"])
        mesh.add_peer("hop-a", mesh.setup_key("laptops"), wait=None)
        mesh.add_peer("hop-b", mesh.setup_key("hops"), "--allow-server-ssh", wait=None)
        mesh.add_peer("hop-c", mesh.setup_key("dbs"), "--allow-server-ssh", wait=None)
        mesh.add_peer("hop-d", mesh.setup_key("others"), "--allow-server-ssh", wait=None)
        mesh.add_peer("hop-e", mesh.setup_key("direct"), "--allow-server-ssh", wait=None)
        for name in ("hop-b", "hop-c", "hop-d", "hop-e"):
            mesh.wait_status(name, "serving")
        mesh.wait_status("hop-a", None)
        cfg = mesh.login(*ALICE)
        ids = {n: mesh.status(n)["peer_id"] for n in mesh.peers}
        ips = {n: mesh.status(n)["mesh_ip"] for n in mesh.peers}
        launcher = write_user_launcher(base)
        yield World(mesh, cfg, session_user.pw_name, Path(session_user.pw_dir), ids, ips, launcher)
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()
        shutil.rmtree(base, ignore_errors=True)


def _text(r: subprocess.CompletedProcess) -> str:
    return f"rc={r.returncode}\nstdout={r.stdout.decode(errors='replace')}\nstderr={r.stderr.decode(errors='replace')}"


def test_second_hop_with_a_delegated_token(world: World) -> None:
    r = world.on_a("-A", "--delegate-to", "hop-c", f"{world.user}@hop-b", "--", world.second_hop("hop-c"))
    assert r.returncode == 0, _text(r)
    assert r.stdout.decode().strip() == world.user
    assert b"refused" not in r.stderr, _text(r)


def test_group_entry_and_audit_chain_at_management(world: World) -> None:
    before = {e["id"] for e in world.events("hop-c", "exec")}
    r = world.on_a("--delegate-to", "group:dbs", f"{world.user}@hop-b", "--",
                   world.second_hop("hop-c", "echo chain-marker"))
    assert r.returncode == 0, _text(r)
    assert r.stdout.decode().strip() == "chain-marker"
    deadline = time.monotonic() + 20
    new: list[dict] = []
    while time.monotonic() < deadline and not new:
        new = [e for e in world.events("hop-c", "exec")
               if e["id"] not in before and "chain-marker" in e.get("command", "")]
        time.sleep(0.2)
    assert new, "C's exec event did not reach management"
    ev = new[0]
    assert ev["identity"] == ALICE[0]
    assert ev["via"] == world.ids["hop-b"]  # from the SSH token's via claim
    assert ev.get("source_ip") == world.ips["hop-b"]
    # Management's own log records the delegated exchange too.
    assert world.mesh.mgmt is not None
    minted = [json.loads(line) for line in world.mesh.mgmt.output().splitlines()
              if line.startswith("{") and '"idp.ssh_token"' in line]
    assert any(m.get("via") == world.ids["hop-b"] and m.get("delegated") is True
               and m.get("peer") == "hop-c" for m in minted), minted[-3:]


def test_refused_for_a_peer_not_on_the_list(world: World) -> None:
    r = world.on_a("-A", "--delegate-to", "hop-c,group:hops", f"{world.user}@hop-b", "--",
                   world.second_hop("hop-d"))
    assert r.returncode == 255, _text(r)
    err = r.stderr.decode()
    # B's meshssh explains (its stderr travels back through the session) ...
    assert ("meshssh: delegation refused by your client on hop-a: hop-d is not in "
            "--delegate-to (hop-c, group:hops)") in err, err
    # ... and A's meshssh printed its own one-line notice.
    assert "meshssh: refused a token for hop-d asked through hop-b: hop-d is not in --delegate-to" in err, err
    assert b"\n" + world.user.encode() not in b"\n" + r.stdout


def test_target_refuses_a_source_its_policy_does_not_name(world: World) -> None:
    """A token is not enough: hop-e admits alice from A only, so the hop through B is
    refused by hop-e itself, and its refusal event names the chain."""
    before = {e["id"] for e in world.events("hop-e", "auth.refused")}
    r = world.on_a("--delegate-to", "hop-e", f"{world.user}@hop-b", "--", world.second_hop("hop-e"))
    assert r.returncode == 255, _text(r)
    assert "permission denied" in r.stderr.decode().lower(), _text(r)
    deadline = time.monotonic() + 20
    new: list[dict] = []
    while time.monotonic() < deadline and not new:
        new = [e for e in world.events("hop-e", "auth.refused") if e["id"] not in before]
        time.sleep(0.2)
    assert new, "hop-e's refusal did not reach management"
    assert new[0]["identity"] == ALICE[0] and new[0]["via"] == world.ids["hop-b"], new[0]
    assert new[0]["source_ip"] == world.ips["hop-b"]


def test_bare_agent_forwarding_delegates_no_tokens(world: World) -> None:
    r = world.on_a("-A", f"{world.user}@hop-b", "--", world.second_hop("hop-c"))
    assert r.returncode == 255, _text(r)
    err = r.stderr.decode()
    assert "delegation refused by your client on hop-a: token delegation is off" in err, err
    assert "--delegate-to hop-c" in err


def test_each_grant_is_announced_on_a_and_the_budget_ends_the_minting(world: World) -> None:
    """Two second hops in one connection with --delegate-max 1: the first is granted and
    announced on A, the second refused on both sides; nothing is minted silently."""
    hops = f"{world.second_hop('hop-c', 'echo first')}; {world.second_hop('hop-c', 'echo second')}"
    r = world.on_a("--delegate-to", "hop-c", "--delegate-max", "1", f"{world.user}@hop-b", "--", hops)
    err = r.stderr.decode()
    assert r.stdout.decode().split() == ["first"], _text(r)
    assert err.count("meshssh: delegated a token for hop-c to the session on hop-b (1 of 1 for this "
                     "connection)") == 1, err
    assert ("delegation refused by your client on hop-a: this connection's budget of 1 delegated "
            "tokens is spent (--delegate-max)") in err, err


def test_delegate_confirm_asks_askpass_for_every_token(world: World, tmp_path: Path) -> None:
    """--delegate-confirm: $SSH_ASKPASS (started with SSH_ASKPASS_PROMPT=confirm) decides."""
    asked = tmp_path / "asked"
    askpass = tmp_path / "askpass"
    askpass.write_text(f'#!/bin/sh\necho "$SSH_ASKPASS_PROMPT: $1" >> {asked}\n'
                       f'[ "$(cat {tmp_path}/answer)" = yes ]\n')
    askpass.chmod(0o755)
    for answer, code in (("no", 255), ("yes", 0)):
        (tmp_path / "answer").write_text(answer)
        r = world.on_a("--delegate-to", "hop-c", "--delegate-confirm", f"{world.user}@hop-b", "--",
                       world.second_hop("hop-c"), SSH_ASKPASS=str(askpass))
        assert r.returncode == code, _text(r)
    assert asked.read_text().splitlines() == [
        f"confirm: Allow the session on hop-b a token for hop-c as {ALICE[0]}?"] * 2
    assert "refused a token for hop-c asked through hop-b: not confirmed (--delegate-confirm)" in \
        _text(world.on_a("--delegate-to", "hop-c", "--delegate-confirm", f"{world.user}@hop-b", "--",
                         world.second_hop("hop-c"), SSH_ASKPASS="/bin/false"))
    r = world.on_a("--delegate-to", "hop-c", "--delegate-confirm", f"{world.user}@hop-b", "true",
                   SSH_ASKPASS="")
    assert r.returncode == 255 and b"--delegate-confirm needs SSH_ASKPASS" in r.stderr, _text(r)


def test_b_never_holds_a_login_or_token_cache(world: World) -> None:
    login = json.loads((world.cfg / "login.json").read_text())
    refresh = login["refresh_token"]
    access = json.loads((world.cfg / "access.json").read_text())["token"]
    probe = ("env; echo ---; ls -a ~/.config/meshssh 2>&1; echo ---; "
             f"{world.second_hop('hop-c')}; echo ---; ls -a ~/.config/meshssh 2>&1; "
             "grep -rl mrt_ ~ 2>/dev/null || echo no-refresh-token-files")
    r = world.on_a("--delegate-to", "hop-c", f"{world.user}@hop-b", "--", probe)
    assert r.returncode == 0, _text(r)
    out = r.stdout.decode()
    env, before, hop, after = out.split("---\n")[:4]
    assert hop.strip() == world.user
    assert "SSH_AUTH_SOCK=" in env
    for secret in (refresh, access):
        assert secret not in out and secret not in r.stderr.decode()
    assert "No such file" in before and "No such file" in after, out
    assert "no-refresh-token-files" in after, out
    assert not (world.home / ".config" / "meshssh").exists()


def test_agent_passthrough_only_with_dash_a(world: World, tmp_path: Path) -> None:
    """With -A the real ssh-agent's keys show on B beside the broker; --delegate-to alone
    forwards the broker but none of the agent's keys."""
    require_tool("ssh-agent")
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deleg-test", "-f", str(key)],
                   check=True)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["ssh-add", "-q", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                       check=True, capture_output=True)
        cmd = f"ssh-add -L; {world.second_hop('hop-c')}"
        r = world.on_a("-A", "--delegate-to", "hop-c", f"{world.user}@hop-b", "--", cmd,
                       SSH_AUTH_SOCK=str(sock))
        assert r.returncode == 0, _text(r)
        lines = r.stdout.decode().splitlines()
        assert any(line.endswith("deleg-test") for line in lines), _text(r)
        assert lines[-1] == world.user
        r = world.on_a("--delegate-to", "hop-c", f"{world.user}@hop-b", "--", cmd,
                       SSH_AUTH_SOCK=str(sock))
        assert r.returncode == 0, _text(r)
        assert b"deleg-test" not in r.stdout and b"no identities" in r.stdout, _text(r)
    finally:
        agent.kill()
        agent.wait()


@pytest.fixture(scope="module")
def dropin(world: World) -> Path:
    """`meshssh config install` into a directory of the mesh's own, for OpenSSH on A."""
    d = world.mesh.dir / "sshconf"
    r = world.on_a("config", "install", "--path", str(d / "drop"))
    assert r.returncode == 0, _text(r)
    conf = d / "ssh_config"
    conf.write_text(f"Include {d / 'drop' / '99-meshssh.conf'}\n")
    return conf


def _ossh(world: World, conf: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = world.mesh.client_env(world.cfg, "hop-a", MESHSSH_SOURCE_ADDRESS=world.ips["hop-a"], **extra)
    env["PATH"] = f"{Path(console_script('meshssh')).parent}:{env.get('PATH', '')}"
    return subprocess.run([require_tool("ssh"), "-F", str(conf), *args], capture_output=True, timeout=60, env=env)


def test_openssh_on_a_delegates_with_the_environment_variable(world: World, dropin: Path) -> None:
    """`MESHSSH_DELEGATE_TO=hop-c ssh hop-b` through the drop-in: the proxy forwards the broker."""
    r = _ossh(world, dropin, f"{world.user}@hop-b", world.second_hop("hop-c"), MESHSSH_DELEGATE_TO="hop-c")
    assert r.returncode == 0, _text(r)
    assert r.stdout.decode().strip() == world.user
    r = _ossh(world, dropin, f"{world.user}@hop-b", world.second_hop("hop-d"), MESHSSH_DELEGATE_TO="hop-c")
    assert r.returncode == 255, _text(r)
    assert "delegation refused by your client on hop-a: hop-d is not in --delegate-to (hop-c)" in r.stderr.decode()
    r = _ossh(world, dropin, f"{world.user}@hop-b", world.second_hop("hop-c"))  # no broker: B has no way in
    assert r.returncode == 255 and b"not logged in" in r.stderr, _text(r)
