"""deploy/meshsshd.example.toml is valid and documents every config key."""

from __future__ import annotations

import re
from pathlib import Path

from meshsshd.config import JWT_KEYS, KNOWN_KEYS, Limits, settings_from_toml

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "meshsshd.example.toml"


def test_example_parses_with_defaults():
    settings = settings_from_toml(EXAMPLE)
    assert settings.limits == Limits()
    assert settings.listen == (("127.0.0.1", 22022),)
    assert not (settings.sftp or settings.root_login or settings.disable_auth)


def test_example_mentions_every_key():
    text = EXAMPLE.read_text()
    mentioned = set(re.findall(r"^[#\s]*\[*([a-z_]+)\]*\s*=?", text, re.M))
    limit_keys = set(Limits.__dataclass_fields__)
    missing = (KNOWN_KEYS | JWT_KEYS | limit_keys) - mentioned
    assert not missing, f"undocumented keys: {sorted(missing)}"
