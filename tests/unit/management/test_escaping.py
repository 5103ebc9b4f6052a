"""Control characters become visible escapes; everything else, backslashes included, stays."""

from __future__ import annotations

import json

import pytest

from meshmgmt.escaping import escape_controls, escape_strings


@pytest.mark.parametrize(("raw", "shown"), [
    pytest.param("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07", id="osc-title"),
    pytest.param("\x1b[2J", "\\x1b[2J", id="csi-clear"),
    pytest.param("\x9b31m", "\\x9b31m", id="c1-csi"),
    pytest.param("a\tb\nc\rd\x00e\x7f", "a\\tb\\nc\\rd\\x00e\\x7f", id="c0-and-del"),
    pytest.param("x\u2028y\u2029z", "x\\u2028y\\u2029z", id="line-separators"),
    pytest.param("\u202eexe.sh\u2066\u200f\u061c", "\\u202eexe.sh\\u2066\\u200f\\u061c", id="bidi"),
    pytest.param("\ud800", "\\ud800", id="lone-surrogate"),
    pytest.param("grep 'a\\x1b' — é 日本 🙂", "grep 'a\\x1b' — é 日本 🙂", id="printable-unchanged"),
])
def test_escape_controls(raw: str, shown: str) -> None:
    assert escape_controls(raw) == shown
    assert escape_controls(shown) == shown  # a second pass (printing stored rows) changes nothing


def test_escape_strings_walks_json_and_stays_valid_json() -> None:
    doc = {"events": [{"command": "\x1b[2J", "bytes_in": 3, "ok": True, "k\x1b": None}], "next": 7}
    out = escape_strings(doc)
    assert out == {"events": [{"command": "\\x1b[2J", "bytes_in": 3, "ok": True, "k\\x1b": None}], "next": 7}
    text = json.dumps(out, ensure_ascii=False)
    assert "\x1b" not in text and json.loads(text) == out
