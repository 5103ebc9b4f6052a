"""The fixes refusals name are real: flags of `meshsshd up`, keys of meshsshd.toml,
options of `meshmgmt serve` (meshsshd/remedies.py)."""

from __future__ import annotations

import msgspec
import pytest

from meshmgmt.cli import main as meshmgmt
from meshsshd.cli import main as meshsshd
from meshsshd.config import ConfigFile, ServerSettings
from meshsshd.remedies import _REMEDIES, remedy, with_remedy


def _options(command) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", ())}


@pytest.mark.parametrize("setting", sorted(_REMEDIES))
def test_each_remedy_names_a_real_setting_flag_and_key(setting):
    managed, standalone = _REMEDIES[setting]
    assert setting in {f for f in ServerSettings.__dataclass_fields__}
    key = standalone.split()[0]
    assert key in {f.name for f in msgspec.structs.fields(ConfigFile)}, standalone
    program, command, flag = managed.split()[-3:]
    cli = {"meshsshd": meshsshd, "meshmgmt": meshmgmt}[program]
    assert flag in _options(cli.commands[command]), managed


@pytest.mark.parametrize(("setting", "managed", "expected"), [
    pytest.param("local_port_forwarding", True, "no (meshsshd up --enable-ssh-local-port-forwarding)",
                 id="managed-flag"),
    pytest.param("remote_port_forwarding", False, "no (remote_port_forwarding = true in meshsshd.toml)",
                 id="standalone-key"),
    pytest.param("", True, "no", id="no-setting-can-lift-it"),
])
def test_with_remedy(setting, managed, expected):
    assert with_remedy("no", setting, managed=managed) == expected
    assert (remedy(setting, managed=managed) == "") == (setting == "")
