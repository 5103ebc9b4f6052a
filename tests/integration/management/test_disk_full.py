"""A full disk under the SQLite data dir (issue 12, item 24): writes answer 503 with the
reason, the log says "disk full" once (not per request), `/healthz` reports the store
unhealthy, nothing is half-written, and all of it recovers once there is room again.

The data dir is a small tmpfs this test mounts (root only), filled with a ballast file."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support import require_root, require_tool

from .mgmtkit import Mgmt, call, init_data_dir, start_serve


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "16m") -> Iterator[Path]:
    require_root()
    require_tool("mount")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "meshmgmt-test", str(where)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(path: Path) -> None:
    """Write until ENOSPC (bounded by the tmpfs size)."""
    chunk = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)


@pytest.fixture
def full_disk_mgmt(tmp_path: Path) -> Iterator[Mgmt]:
    with small_tmpfs(tmp_path / "fs") as fs:
        data_dir = fs / "mgmt"
        token = init_data_dir(data_dir)
        mgmt = start_serve(data_dir, token, log_dir=tmp_path)
        try:
            yield mgmt
        finally:
            mgmt.proc.stop()
            (fs / "ballast").unlink(missing_ok=True)


async def test_disk_full_is_named_answered_503_and_reported_by_healthz(full_disk_mgmt: Mgmt) -> None:
    mgmt = full_disk_mgmt
    ballast = mgmt.data_dir.parent / "ballast"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await call(http, "GET", mgmt.url + "/healthz", expect=200)
        fill(ballast)
        # SQLite may still reuse room in its WAL for a few writes: write until one is refused.
        refused = None
        written: list[str] = []
        for _ in range(300):
            name = "g" + secrets.token_hex(45)
            status, doc = await call(http, "POST", mgmt.url + "/api/groups", headers=mgmt.admin,
                                     json={"name": name})
            if status == 201:
                written.append(name)
                continue
            refused = (name, status, doc)
            break
        assert refused is not None, "a full disk never refused a write"
        name, status, doc = refused
        assert status == 503, (status, doc)
        assert doc["error"] == "store_full" and "disk" in doc["message"] and "full" in doc["message"], doc
        # A second refused write says the same and does not log again.
        status, doc = await call(http, "POST", mgmt.url + "/api/groups", headers=mgmt.admin,
                                 json={"name": "g" + secrets.token_hex(8)})
        assert status == 503, doc
        status, doc = await call(http, "GET", mgmt.url + "/healthz")
        assert status == 503 and doc["error"] == "store_unhealthy" and "disk full" in doc["message"], doc

        lines = [json.loads(line) for line in mgmt.proc.output().splitlines() if line.startswith("{")]
        failed = [e for e in lines if e.get("event") == "store.write_failed"]
        assert len(failed) == 1 and failed[0]["disk_full"] is True and "disk full" in failed[0]["reason"], failed
        assert not [e for e in lines if e.get("level") == "error" and e.get("event") != "store.write_failed"], \
            "a full disk must not be logged as an unhandled error"

        ballast.unlink()
        status, doc = await call(http, "GET", mgmt.url + "/healthz")
        assert status == 200, doc
        _, groups = await call(http, "GET", mgmt.url + "/api/groups", headers=mgmt.admin, expect=200)
        names = {g["name"] for g in (groups.get("groups", groups) if isinstance(groups, dict) else groups)}
        assert name not in names, "the refused write left a row behind"
        assert set(written) <= names, "a write answered 201 was lost"
        await call(http, "POST", mgmt.url + "/api/groups", headers=mgmt.admin, json={"name": name}, expect=201)
    assert "store.write_recovered" in mgmt.proc.output()
