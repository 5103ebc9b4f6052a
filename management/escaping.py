"""Control characters in text that people read become visible escapes.

Audit fields (commands, identities, reasons, forward specs) come from SSH clients and
peers, and admins read them in a terminal (`meshmgmt events list --follow`). A raw ESC
there is an instruction to the admin's terminal: `\\x1b]0;…\\x07` retitles the window,
`\\x1b[2J` clears the screen, OSC 8 makes links, and some terminals answer queries by
typing into the shell. So every character a terminal may act on is shown as an escape:

- C0 (U+0000–U+001F, tab and newline included: a newline would forge a second row),
  DEL, and C1 (U+0080–U+009F: U+009B alone is a CSI on many terminals);
- U+2028/U+2029 (line breaks for some viewers) and the bidi controls (U+061C,
  U+200E/F, U+202A–U+202E, U+2066–U+2069), which reorder what an admin sees;
- lone surrogates, which no terminal or UTF-8 encoder takes.

Applied at ingest (the store never holds them raw) and again when printing (rows written
before this existed). Backslashes are left alone on purpose: escaping them would make the
second pass double the first one's escapes, and a literal `\\x1b` typed by a user is
harmless text; the price is that the two look alike.
"""

from __future__ import annotations

import re
from typing import Any

_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_CONTROLS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character as a visible escape (`\\x1b`, `\\u202e`)."""
    return _CONTROLS.sub(_escape, text)


def escape_strings(doc: Any) -> Any:
    """`doc` (JSON-shaped: dicts, lists, scalars) with every string escaped, keys too."""
    if isinstance(doc, str):
        return escape_controls(doc)
    if isinstance(doc, dict):
        return {escape_controls(k) if isinstance(k, str) else k: escape_strings(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [escape_strings(v) for v in doc]
    return doc


__all__ = ["escape_controls", "escape_strings"]
