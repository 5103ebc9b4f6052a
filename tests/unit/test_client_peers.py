"""Host resolution against the peer list, detect's classification, cp paths."""

from __future__ import annotations

import pytest

from meshssh_client.cp import CpPath, parse_cp_path, plan
from meshssh_client.detect import JWT_REQUIRED, NO_JWT, OTHER, classify
from meshssh_client.errors import ManagementError, UsageError
from meshssh_client.peers import match_peer, parse_peer_list
from meshsshd.netmap import PeerInfo

PEERS = [
    PeerInfo(id="p1", name="db-1", fqdn="db-1.mesh.internal", mesh_ip="100.64.0.2"),
    PeerInfo(id="p2", name="web", fqdn="web.mesh.internal", mesh_ip="fd00::5"),
    PeerInfo(id="p3", name="db-10", fqdn="db-10.mesh.internal", mesh_ip="100.64.0.10"),
]


@pytest.mark.parametrize("host, expect", [
    ("db-1", "p1"), ("DB-1", "p1"), ("db-1.mesh.internal", "p1"), ("db-1.mesh.internal.", "p1"),
    ("100.64.0.2", "p1"), ("p3", "p3"), ("fd00:0::5", "p2"), ("[fd00::5]", "p2"),
    ("db", None), ("100.64.0.1", None), ("db-1.other", None), ("", None), ("db-", None),
])
def test_match_peer(host: str, expect: str | None) -> None:
    got = match_peer(PEERS, host)
    assert (got.id if got else None) == expect


def test_an_id_means_that_peer_even_when_another_is_named_like_it() -> None:
    victim = PeerInfo(id="0123456789abcdef", name="db-2", fqdn="db-2.mesh.internal", mesh_ip="100.64.0.3")
    impostor = PeerInfo(id="fedcba9876543210", name="0123456789abcdef", fqdn="0123456789abcdef.mesh.internal",
                        mesh_ip="100.64.0.4")
    for order in ([impostor, victim], [victim, impostor]):
        assert match_peer(order, "0123456789abcdef") is victim


def test_peer_list_skips_bad_entries() -> None:
    doc = {"peers": [PEERS[0].to_dict(), {"id": "x"}, "junk", {**PEERS[1].to_dict(), "ssh_host_keys": 3}]}
    assert [p.id for p in parse_peer_list(doc)] == ["p1"]
    with pytest.raises(ManagementError):
        parse_peer_list({"nope": []})


@pytest.mark.parametrize("line, code", [
    ("SSH-2.0-meshsshd_0.1 meshsshd-jwt", JWT_REQUIRED),
    ("SSH-2.0-meshsshd_0.1 meshsshd-jwt\r\n", JWT_REQUIRED),
    ("SSH-2.0-meshsshd_0.1", NO_JWT),
    ("SSH-2.0-meshsshd_0.1 other", NO_JWT),
    ("SSH-2.0-OpenSSH_9.2p1 meshsshd-jwt", OTHER),  # the marker alone proves nothing
    ("SSH-2.0-OpenSSH_9.2p1 Debian-2", OTHER),
    ("SSH-1.5-meshsshd", OTHER),
    ("HTTP/1.1 400 Bad Request", OTHER),
    ("", OTHER),
])
def test_detect_classify(line: str, code: int) -> None:
    assert classify(line) == code


@pytest.mark.parametrize("text, expect", [
    ("db-1:/tmp/x", CpPath(None, "db-1", "/tmp/x")),
    ("bob@db-1:x", CpPath("bob", "db-1", "x")),
    ("db-1:", CpPath(None, "db-1", "")),
    ("./a:b", CpPath(None, None, "./a:b")),
    ("/abs/a:b", CpPath(None, None, "/abs/a:b")),
    ("plain", CpPath(None, None, "plain")),
    ("[fd00::5]:/x", CpPath(None, "fd00::5", "/x")),
])
def test_cp_paths(text: str, expect: CpPath) -> None:
    assert parse_cp_path(text) == expect


def test_cp_plan() -> None:
    srcs, dst, d = plan(["a", "b", "db-1:/tmp/"])
    assert d == "up" and [s.path for s in srcs] == ["a", "b"] and dst.host == "db-1"
    srcs, dst, d = plan(["db-1:a", "db-1:b", "."])
    assert d == "down" and dst.path == "."
    for bad in (["a"], ["a", "b"], ["db-1:a", "db-2:b", "."], ["db-1:a", "db-2:b"]):
        with pytest.raises(UsageError):
            plan(bad)
