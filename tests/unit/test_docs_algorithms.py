"""The key exchanges the docs promise are the ones meshsshd/algorithms.py offers: README
once listed `ecdh-sha2-nistp*`, which the server never offered."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshsshd.algorithms import KEX_ALGS, mac_algs

ROOT = Path(__file__).resolve().parents[2]


def _kex_names(text: str, start: str) -> list[str]:
    """The backticked names from `start` up to the first ';' after it."""
    i = text.index(start) + len(start)
    return re.findall(r"`([^`]+)`", text[i:text.index(";", i)])


@pytest.mark.parametrize("doc, start", [
    pytest.param("README.md", "explicit allowlists — kex ", id="readme"),
    pytest.param("docs/server.md", "- Key exchange: ", id="server-doc"),
])
def test_documented_kex_list_is_the_offered_one(doc: str, start: str) -> None:
    assert _kex_names((ROOT / doc).read_text(), start) == list(KEX_ALGS)


def test_documented_mac_list_is_the_offered_one() -> None:
    text = (ROOT / "docs/server.md").read_text()
    i = text.index("- MACs: ")
    assert re.findall(r"`([^`]+)`", text[i:text.index(";", i)]) == list(mac_algs(False))
