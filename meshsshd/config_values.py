"""Checks for single numbers in documents that are not read through a msgspec schema
(the network map in `netmap.py`, JWT claims in `auth.py`); the config files state the
same bounds in their types (`schema.py`, with MAX_NUMBER from here).

TOML and JSON both accept `nan`, `inf` and (JSON) `1e309` → inf. A NaN compares false
with everything, so `now > exp + leeway` with `leeway = nan` never refuses: every
number that reaches a comparison must be finite, and none of ours may be negative.
Each check returns a problem (a phrase to follow the key's name) or None, so each caller
raises its own error type with its own wording of where the key lives.
"""

from __future__ import annotations

import math
from typing import Any

# Larger than any timeout, count or byte size we mean, small enough to stay exact as a float.
MAX_NUMBER = 2**53


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


def number_problem(value: Any, *, integer: bool = False) -> str | None:
    """Why `value` is not a finite, non-negative number (an integer if `integer`), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a whole number" if integer else "must be a number"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, not {_short(value)}"
    if integer and not isinstance(value, int):
        return f"must be a whole number, not {_short(value)}"
    if value < 0:
        return f"must not be negative (got {_short(value)})"
    if value > MAX_NUMBER:
        return f"is too large (at most {MAX_NUMBER})"
    return None
