"""The OpenSSH drop-in: rendering, hostile names, the include check, install locations."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from meshssh_client.errors import ClientError
from meshssh_client.sshconfig import (DROPIN_NAME, SYSTEM_DROPIN_DIR, SYSTEM_KNOWN_HOSTS, add_include,
                              drop_include, locations, peer_names, render_dropin,
                              render_known_hosts, system_includes, valid_key_line)
from meshsshd.netmap import PeerInfo
from tests.support import require, require_tool


def ed25519_line(seed: bytes = b"k") -> str:
    blob = len(b"ssh-ed25519").to_bytes(4, "big") + b"ssh-ed25519" + (32).to_bytes(4, "big") + seed.ljust(32, b"0")
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


def peer(name="db-1", fqdn="db-1.mesh.internal", ip="100.64.0.2", keys=None, ssh=True) -> PeerInfo:
    return PeerInfo(id=f"id-{name}", name=name, fqdn=fqdn, mesh_ip=ip,
                    ssh_host_keys=tuple(keys if keys is not None else [ed25519_line()]), ssh_enabled=ssh)


def entries(*peers: PeerInfo, problems: list | None = None) -> list:
    problems = problems if problems is not None else []
    return [e for p in peers if (e := peer_names(p, problems))]


HOSTILE = [
    'db-1"\n    ProxyCommand evil',
    "db-1 ProxyCommand=evil",
    "db-1,*",
    "*",
    "!db-1",
    "db-1%h",
    "db\tx",
    "-oProxyCommand=evil",
    "db-1\nHost *",
    "a" * 64,
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_never_reach_the_config(name: str) -> None:
    problems: list[str] = []
    es = entries(peer(name=name, fqdn=name + ".mesh.internal"), problems=problems)
    text = render_dropin(es, "/usr/bin/meshssh", Path("/etc/ssh/kh"))
    assert "evil" not in text and "Host *" not in text and "%h\"" not in text.replace('%h %p"', "")
    assert problems  # and the user is told what was skipped
    # The IP is still usable; nothing else from the hostile peer appears.
    assert "100.64.0.2" in text
    assert all(name not in line for line in text.splitlines() if not line.startswith("#"))


def test_hostile_ip_and_keys_are_skipped() -> None:
    problems: list[str] = []
    forged = "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa" + b"x" * 40).decode()
    es = entries(peer(ip="100.64.0.2\nHost *", keys=["ssh-ed25519 !!!", "ssh-ed25519 AAAA\nHost *",
                                                      forged, "ssh-dss AAAA", ed25519_line()]),
                 problems=problems)
    assert es[0].names == ("db-1", "db-1.mesh.internal")
    assert es[0].keys == (ed25519_line(),)
    assert len(problems) == 5


def test_render_blocks_in_first_value_wins_order() -> None:
    es = entries(peer(), peer(name="lo-1", fqdn="lo-1.mesh.internal", ip="127.77.0.9"),
                 peer(name="nossh", fqdn="", ip="100.64.0.7", ssh=False))
    text = render_dropin(es, "/opt/mesh/bin/meshssh", Path("/etc/ssh/kh"))
    i_hostname = text.index("Hostname 100.64.0.2")
    i_port = text.index("Port 22022")
    i_match = text.index("Match host")
    i_strict = text.index("StrictHostKeyChecking yes")
    assert i_hostname < i_port < i_match < i_strict
    match_line = next(l for l in text.splitlines() if l.startswith("Match host"))
    assert match_line == ('Match host "db-1,db-1.mesh.internal,100.64.0.2,lo-1,lo-1.mesh.internal,'
                          '127.77.0.9" exec "/opt/mesh/bin/meshssh detect %h %p"')
    assert "nossh" not in match_line  # not serving SSH: no proxy, but its key is still checked
    assert "    ProxyCommand /opt/mesh/bin/meshssh proxy %h %p" in text
    port_block = text[text.rindex("Host ", 0, i_port):i_port]
    assert "lo-1" in port_block and "db-1" not in port_block  # only loopback peers get 22022
    assert "GlobalKnownHostsFile /etc/ssh/kh" in text


def test_known_hosts_has_both_port_forms() -> None:
    kh = render_known_hosts(entries(peer()))
    lines = [l for l in kh.splitlines() if not l.startswith("#")]
    assert lines == [f"db-1,db-1.mesh.internal,100.64.0.2 {ed25519_line()}",
                     f"[db-1]:22022,[db-1.mesh.internal]:22022,[100.64.0.2]:22022 {ed25519_line()}"]


def test_unsafe_executable_path_is_refused() -> None:
    with pytest.raises(ClientError):
        render_dropin(entries(peer()), "/home/me/my tools/meshssh", Path("/etc/ssh/kh"))
    with pytest.raises(ClientError):
        render_dropin(entries(peer()), '/x/"meshssh', Path("/etc/ssh/kh"))


def test_openssh_parses_the_rendered_config(tmp_path: Path) -> None:
    """`ssh -G` (parse only, no connection) must accept the file and apply our values."""
    ssh = require_tool("ssh")
    kh = tmp_path / "kh"
    es = entries(peer(), peer(name="lo-1", fqdn="lo-1.mesh.internal", ip="127.77.0.9"))
    kh.write_text(render_known_hosts(es))
    drop = tmp_path / DROPIN_NAME
    drop.write_text(render_dropin(es, "/bin/true", kh))  # detect "succeeds"
    cfg = tmp_path / "cfg"
    cfg.write_text(f"Include {drop}\n")
    out = subprocess.run([ssh, "-G", "-F", str(cfg), "lo-1"], capture_output=True, text=True, check=True).stdout
    conf = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert conf["hostname"] == "127.77.0.9"
    assert conf["port"] == "22022"
    assert conf["proxycommand"] == "/bin/true proxy %h %p"
    assert conf["stricthostkeychecking"] == "false"  # only for the proxied hop
    assert conf["globalknownhostsfile"] == "/dev/null"
    out = subprocess.run([ssh, "-G", "-F", str(cfg), "unrelated.example"], capture_output=True,
                         text=True, check=True).stdout
    assert "proxycommand" not in out.lower().replace("proxycommand none", "")


def test_openssh_direct_peer_gets_managed_known_hosts(tmp_path: Path) -> None:
    ssh = require_tool("ssh")
    kh = tmp_path / "kh"
    es = entries(peer())
    drop = tmp_path / DROPIN_NAME
    drop.write_text(render_dropin(es, "/bin/false", kh))  # detect "fails": no JWT here
    cfg = tmp_path / "cfg"
    cfg.write_text(f"Include {drop}\n")
    out = subprocess.run([ssh, "-G", "-F", str(cfg), "db-1"], capture_output=True, text=True, check=True).stdout
    conf = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert conf["globalknownhostsfile"] == str(kh)
    assert conf["userknownhostsfile"] == "/dev/null"  # management's keys only
    assert conf["stricthostkeychecking"] == "true"
    assert "proxycommand" not in conf


def test_untrusted_by_root(tmp_path: Path) -> None:
    import os

    from meshssh_client.sshconfig import untrusted_by_root

    os.chmod(tmp_path, 0o755)
    interp = tmp_path / "python"
    interp.write_text("")
    script = tmp_path / "meshssh"
    script.write_text(f"#!{interp}\n")
    for p in (interp, script):
        p.chmod(0o755)
    ok = untrusted_by_root(str(script))
    require(ok is None, f"the test directory itself is not root's only: {ok}")
    interp.chmod(0o777)
    assert untrusted_by_root(str(script)) == f"{interp} is writable by group or others (mode 777)"
    interp.chmod(0o755)
    link = tmp_path / "sub"
    link.mkdir(mode=0o755)
    os.symlink(script, link / "meshssh")
    os.chown(link, 65534, 65534)
    assert untrusted_by_root(str(link / "meshssh")) == f"{link} belongs to uid 65534, not root"


@pytest.mark.parametrize("text, included", [
    ("Include /etc/ssh/ssh_config.d/*.conf\n\nHost *\n", True),
    ("# c\ninclude ssh_config.d/*.conf\n", True),
    ("Include=/etc/ssh/ssh_config.d/99-meshssh.conf\n", True),
    ("Host *\n    Include /etc/ssh/ssh_config.d/*.conf\n", False),  # only inside a Host block
    ("Include /etc/ssh/other.d/*.conf\n", False),
    ("", False),
])
def test_system_include_check(text: str, included: bool) -> None:
    assert system_includes(text, SYSTEM_DROPIN_DIR / DROPIN_NAME) is included


def test_the_real_debian_config_includes_the_dropin_dir() -> None:
    real = Path("/etc/ssh/ssh_config")
    require(real.exists(), "needs openssh-client's /etc/ssh/ssh_config")
    assert system_includes(real.read_text(), SYSTEM_DROPIN_DIR / DROPIN_NAME)


def test_locations() -> None:
    home = Path("/home/alice")
    assert locations(None, 0, home).dropin == Path("/etc/ssh/ssh_config.d/99-meshssh.conf")
    assert locations(None, 0, home).known_hosts == SYSTEM_KNOWN_HOSTS
    assert locations(None, 0, home).user_config is None
    user = locations(None, 1000, home)
    assert user.dropin == home / ".ssh/config.d/99-meshssh.conf"
    assert user.user_config == home / ".ssh/config"
    assert locations("/tmp/x", 0, home).dropin == Path("/tmp/x/99-meshssh.conf")
    assert locations(None, 0, home, scope="user").user_config == home / ".ssh/config"


def test_include_line_added_once_and_removed() -> None:
    orig = "Host foo\n    User bar\n"
    once = add_include(orig, "config.d/99-meshssh.conf")
    assert once.splitlines()[1] == "Include config.d/99-meshssh.conf"
    assert once.index("Include") < once.index("Host foo")
    assert add_include(once, "config.d/99-meshssh.conf") == once
    assert drop_include(once, "config.d/99-meshssh.conf") == orig


def test_valid_key_line() -> None:
    assert valid_key_line(ed25519_line() + " comment") == ed25519_line()
    assert valid_key_line("ssh-ed25519") is None
    assert valid_key_line("ssh-ed25519 not-base64!") is None
