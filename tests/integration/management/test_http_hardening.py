"""Answers leak nothing a cache or a scanner could use (issue 12, item 26): JSON is not
stored by caches nor sniffed as HTML, the `Server` header names no version, and
`/metrics` can require a bearer token."""

from __future__ import annotations

import re
import secrets
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.support import console_script

from .mgmtkit import Mgmt, call, init_data_dir, mgmt_server


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Mgmt:
    tmp: Path = tmp_path_factory.mktemp("mgmt-metrics-token")
    token_file = tmp / "metrics.token"
    token_file.write_text(secrets.token_urlsafe(24) + "\n")
    with mgmt_server(tmp, extra=("--register-burst", "10000", "--metrics-token-file", str(token_file))) as m:
        m.extra["metrics_token"] = token_file.read_text().strip()
        yield m


async def test_json_answers_are_not_cached_or_sniffed_and_name_no_version(guarded: Mgmt,
                                                                          http: aiohttp.ClientSession) -> None:
    for method, path, headers in (("GET", "/healthz", None), ("GET", "/api/peers", guarded.admin),
                                  ("GET", "/api/peers", None), ("GET", "/api/nothing-here", None),
                                  ("DELETE", "/healthz", None)):
        async with http.request(method, guarded.url + path, headers=headers) as resp:
            assert resp.content_type == "application/json", (path, resp.status)
            assert resp.headers.get("Cache-Control") == "no-store", (method, path, resp.status)
            assert resp.headers.get("X-Content-Type-Options") == "nosniff", (method, path, resp.status)
            server = resp.headers.get("Server", "")
            assert not re.search(r"\d", server), f"Server header names a version: {server!r}"
            assert "aiohttp" not in server.lower() and "python" not in server.lower(), server


async def test_metrics_needs_the_token_from_the_file(guarded: Mgmt, http: aiohttp.ClientSession) -> None:
    token = guarded.extra["metrics_token"]
    status, doc = await call(http, "GET", guarded.url + "/metrics")
    assert status == 401 and doc["error"] == "metrics_unauthorized", doc
    status, _ = await call(http, "GET", guarded.url + "/metrics", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, _ = await call(http, "GET", guarded.url + "/metrics", headers=guarded.admin)
    assert status == 401, "the admin token is not the metrics token"
    async with http.get(guarded.url + "/metrics", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        assert "meshmgmt_maps_computed_total" in await resp.text()
        assert resp.headers.get("X-Content-Type-Options") == "nosniff"


def test_a_missing_metrics_token_file_is_refused_at_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "mgmt"
    init_data_dir(data_dir)
    res = subprocess.run([console_script("meshmgmt"), "serve", "--data-dir", str(data_dir), "--listen",
                          "127.0.0.1:0", "--metrics-token-file", str(tmp_path / "absent")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "--metrics-token-file" in res.stderr and "absent" in res.stderr, res.stderr[-2000:]
