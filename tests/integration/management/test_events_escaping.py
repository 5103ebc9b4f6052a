"""Audit fields never reach the admin's terminal raw (issue 11, item 10).

A peer (real credential, real `meshmgmt serve`) posts events whose command, identity
and reason carry terminal escapes: an OSC title change, a screen clear, a C1 CSI, a
bidi override. The API must hand them out as visible escapes (the store holds no raw
ESC), and the real `meshmgmt events list` must print none of them, as a table, as
`--json`, and with `--follow`; also for a row written raw before the fix.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import threading
from typing import Any

import aiohttp

from tests.support import console_script

from .mgmtkit import Mgmt, call, peer_auth, register_peer

OSC_TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J"
EVIL_COMMAND = f"id{OSC_TITLE}{CLEAR}\x9b31m\u202eexe.sh"
SHOWN_COMMAND = "id\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eexe.sh"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")


def _no_raw(text: str) -> None:
    found = [hex(ord(c)) for c in RAW if c in text]
    assert not found, f"raw control characters {found} printed:\n{text!r}"


async def _evil_events(http: aiohttp.ClientSession, mgmt: Mgmt, marker: str) -> dict[str, Any]:
    _, key = await call(http, "POST", mgmt.url + "/api/setup-keys", headers=mgmt.admin,
                        json={"name": marker}, expect=201)
    peer = await register_peer(http, mgmt, key["key"], marker)
    await call(http, "POST", mgmt.url + "/api/peers/events", headers=peer_auth(peer), expect=202, json={
        "events": [{"type": "exec", "session_id": marker, "command": EVIL_COMMAND,
                    "identity": f"eve@example.com{CLEAR}", "local_user": marker,
                    "reason": f"line one\nline two\x00{OSC_TITLE}"}]})
    return peer


def _follow(mgmt: Mgmt, marker: str, *flags: str) -> str:
    """`meshmgmt [flags] events list --follow --since 1` (0 means "only new") until the marker's event shows."""
    argv = [console_script("meshmgmt"), "--url", mgmt.url, "--token-file", str(mgmt.data_dir / "admin.token"),
            *flags, "events", "list", "--follow", "--since", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(30, proc.kill)  # a hang fails the test instead of the run
    timer.start()
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                break
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    out = "".join(lines)
    assert marker in out, f"the event never came through --follow:\n{out}\n{proc.stderr.read() if proc.stderr else ''}"
    return out


async def test_audit_fields_are_escaped_at_ingest_and_in_every_printer(sqlite_mgmt: Mgmt) -> None:
    mgmt = sqlite_mgmt
    marker = f"esc-{secrets.token_hex(3)}"
    async with aiohttp.ClientSession() as http:
        await _evil_events(http, mgmt, marker)
        _, listed = await call(http, "GET", mgmt.url + "/api/events?type=exec&limit=1000", headers=mgmt.admin,
                               expect=200)
    stored = next(e for e in listed["events"] if e.get("session_id") == marker)
    # Escaped at ingest: the store (and so every API reader) holds no raw control character.
    assert stored["command"] == SHOWN_COMMAND
    assert stored["identity"] == "eve@example.com\\x1b[2J"
    assert stored["reason"] == "line one\\nline two\\x00\\x1b]0;pwned\\x07"  # NUL kept as evidence

    table = mgmt.cli("events", "list", "--limit", "1000").stdout
    _no_raw(table)
    assert "\\x1b]0;pwned" in table, table

    as_json = mgmt.cli("--json", "events", "list", "--limit", "1000").stdout
    _no_raw(as_json)
    shown = next(e for e in json.loads(as_json)["events"] if e.get("session_id") == marker)
    assert shown["command"] == SHOWN_COMMAND  # valid JSON whose values are the visible escapes

    followed = _follow(mgmt, marker)
    _no_raw(followed)
    assert f"command={SHOWN_COMMAND}" in followed
    followed_json = _follow(mgmt, marker, "--json")
    _no_raw(followed_json)
    assert any(json.loads(line).get("command") == SHOWN_COMMAND for line in followed_json.splitlines())


async def test_rows_stored_raw_before_the_fix_are_escaped_when_printed(sqlite_mgmt: Mgmt) -> None:
    """Defence in depth: an event row written before ingest escaped anything (here put
    into the SQLite file directly) still prints without a raw escape, and no value is
    read as rich markup (which would emit an OSC 8 hyperlink itself)."""
    mgmt = sqlite_mgmt
    marker = f"old-{secrets.token_hex(3)}"
    async with aiohttp.ClientSession() as http:
        await _evil_events(http, mgmt, marker)
    legacy = {"session_id": marker, "command": EVIL_COMMAND, "identity": "[link=https://evil.example]x[/link]"}
    db = sqlite3.connect(mgmt.data_dir / "meshmgmt.db", timeout=30)
    try:
        with db:
            db.execute("INSERT INTO events (type, peer_id, time, received_at, data) "
                       "SELECT 'exec', peer_id, time, received_at, ? FROM events "
                       "WHERE type = 'exec' ORDER BY id DESC LIMIT 1", (json.dumps(legacy),))
    finally:
        db.close()

    table = mgmt.cli("events", "list", "--limit", "1000").stdout
    _no_raw(table)
    assert "\\x1b" in table and "[link=" in table, table
    assert "\x1b]8;" not in table
    as_json = mgmt.cli("--json", "events", "list", "--limit", "1000").stdout
    _no_raw(as_json)
    old = [e for e in json.loads(as_json)["events"] if e.get("session_id") == marker]
    assert [e["command"] for e in old] == [SHOWN_COMMAND, SHOWN_COMMAND]
    followed = _follow(mgmt, "[link=https://evil.example]")
    _no_raw(followed)
