"""`completion bash|zsh|fish` on all three commands, and bash really completing with the
script it prints: sub-commands, and for meshssh the cached peers (no network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import console_script, require


@pytest.mark.parametrize("prog", ["meshssh", "meshmgmt", "meshsshd"])
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_for_each_shell(prog: str, shell: str) -> None:
    r = subprocess.run([console_script(prog), "completion", shell], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"_{prog.upper()}_COMPLETE" in r.stdout and f"{shell}_complete" in r.stdout


def _bash_complete(prog: str, words: str, env: dict[str, str]) -> list[str]:
    """Source the printed script in a real bash and run its completion function as bash
    would (with the command name as its first argument)."""
    require(shutil.which("bash") is not None, "bash is not installed")
    script = subprocess.run([console_script(prog), "completion", "bash"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    parts = words.split() + ([""] if words.endswith(" ") else [])
    array = " ".join(f"'{p}'" for p in parts)
    driver = (f"{script}\nCOMP_WORDS=({array}); COMP_CWORD={len(parts) - 1}\n"
              f"_{prog}_completion {prog}\n" 'printf "%s\\n" "${COMPREPLY[@]}"\n')
    bindir = str(Path(console_script(prog)).parent)
    r = subprocess.run(["bash", "--norc", "-c", driver], capture_output=True, text=True, timeout=60,
                       env={**env, "PATH": f"{bindir}:{env.get('PATH', '')}"})
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line]


def test_bash_completes_subcommands_and_cached_peers(tmp_path: Path) -> None:
    (tmp_path / "peers.json").write_text(json.dumps({"peers": [
        {"name": "db-1"}, {"name": "db-2"}, {"name": "web-1"}]}))
    env = {**os.environ, "MESHSSH_CONFIG_DIR": str(tmp_path)}
    assert _bash_complete("meshssh", "meshssh db", env) == ["db-1", "db-2"]
    assert _bash_complete("meshssh", "meshssh alice@we", env) == ["alice@web-1"]
    assert "login" in _bash_complete("meshssh", "meshssh lo", env)
    assert "list" in _bash_complete("meshmgmt", "meshmgmt peers ", env)
