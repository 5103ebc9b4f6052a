"""The OpenSSH drop-in against a real `meshsshd serve` and the system `ssh`, and what a
root `meshssh config install` refuses (client/sshconfig.py).

- A direct peer (no JWT, so no ProxyCommand) is checked against management's keys only:
  a key planted in the user's known_hosts file does not let a different server in.
- Root refuses to write a drop-in whose meshssh someone other than root could replace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from meshssh_client.sshconfig import DROPIN_NAME, peer_names, render_dropin, render_known_hosts
from meshsshd.netmap import PeerInfo
from tests.support import console_script, os_user, require_root, require_tool

from .serverkit import ServerKit, client_key, install_key

pytestmark = [pytest.mark.openssh, pytest.mark.root]


def _host_key_line(srv: ServerKit) -> str:
    r = subprocess.run([require_tool("ssh-keyscan"), "-t", "ed25519", "-p", str(srv.port), "127.0.0.1"],
                       capture_output=True, text=True, timeout=20)
    line = next(line for line in r.stdout.splitlines() if "ssh-ed25519" in line)
    return " ".join(line.split()[1:3])


def _other_key_line(tmp: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "other")], check=True)
    return " ".join((tmp / "other.pub").read_text().split()[:2])


def test_direct_peer_ignores_keys_in_the_users_known_hosts(tmp_path: Path) -> None:
    """Management publishes key K for the peer; the server answering presents another
    key, which an earlier `ssh` left in the user's known_hosts. OpenSSH accepts a key
    from any known_hosts file, so without `UserKnownHostsFile /dev/null` in the direct
    block that planted entry would let the impostor in."""
    require_root()
    ssh = require_tool("ssh")
    key = client_key(tmp_path)
    with os_user("msdrop") as user:
        install_key(user, key)
        config = {"authorized_keys": True,
                  "access": [{"sources": ["127.0.0.0/8"], "identities": [key.identity],
                              "local_users": [user.pw_name]}]}
        with ServerKit(tmp_path / "server", config) as srv:
            presented = _host_key_line(srv)
            peer = PeerInfo(id="p1", name="db-1", fqdn="db-1.mesh.internal", mesh_ip="127.0.0.1",
                            ssh_host_keys=(_other_key_line(tmp_path),), ssh_enabled=False)
            entries = [e for e in [peer_names(peer, [])] if e]
            kh = tmp_path / "managed_known_hosts"
            kh.write_text(render_known_hosts(entries))
            drop = tmp_path / DROPIN_NAME
            drop.write_text(render_dropin(entries, "/bin/false", kh))
            users_kh = tmp_path / "users_known_hosts"   # what ~/.ssh/known_hosts would hold
            users_kh.write_text(f"[127.0.0.1]:{srv.port} {presented}\ndb-1 {presented}\n")
            cfg = tmp_path / "ssh_config"
            # The user's own defaults come after the drop-in (first value wins in ssh_config).
            cfg.write_text(f"Include {drop}\nHost *\n    UserKnownHostsFile {users_kh}\n")
            argv = [ssh, "-F", str(cfg), "-p", str(srv.port), "-i", str(key.path), "-o", "BatchMode=yes",
                    "-o", "IdentitiesOnly=yes", f"{user.pw_name}@db-1", "id -un"]
            r = subprocess.run(argv, capture_output=True, timeout=30)
            assert r.returncode == 255, r.stdout + r.stderr
            assert b"Host key verification failed" in r.stderr, r.stderr
            # The key management publishes is what lets a direct connection in.
            kh.write_text(render_known_hosts([e for e in [peer_names(
                PeerInfo(**{**peer.__dict__, "ssh_host_keys": (presented,)}), [])] if e]))
            r = subprocess.run(argv, capture_output=True, timeout=30)
            assert r.returncode == 0 and r.stdout.decode().strip() == user.pw_name, r.stderr


@pytest.mark.parametrize("spoil", ["others-write-dir", "user-owned-file"])
def test_root_install_refuses_a_meshssh_others_could_replace(tmp_path: Path, spoil: str) -> None:
    """The drop-in's Match exec/ProxyCommand run meshssh as whoever runs ssh, root too."""
    require_root()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "meshssh"
    shutil.copy(console_script("meshssh"), exe)
    os.chmod(tmp_path, 0o755)
    os.chmod(bindir, 0o755)
    if spoil == "others-write-dir":
        os.chmod(bindir, 0o777)
    else:
        os.chown(exe, 65534, 65534)
    env = {**os.environ, "MESHSSH_CONFIG_DIR": str(tmp_path / "cfg"), "MESHSSH_CONTROL": "no"}
    r = subprocess.run([str(exe), "config", "install", "--path", str(tmp_path / "drop")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0, r.stderr
    assert "refusing to write a drop-in that makes root (and every user) run" in r.stderr, r.stderr
    assert not (tmp_path / "drop").exists()
