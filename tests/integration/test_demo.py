"""README's first command must stay true: the demo brings up management, peers and logs in."""

from __future__ import annotations

import os
import subprocess

from tests.support import REPO, require_root


def test_demo_script_runs_end_to_end() -> None:
    require_root()
    env = {**os.environ, "DEMO_EXIT": "1", "DEMO_SKIP_INSTALL": "1",
           "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    if not (REPO / ".venv" / "bin" / "python").exists():
        env["DEMO_SKIP_INSTALL"] = "0"
    proc = subprocess.run([str(REPO / "scripts" / "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "hello from" in out and "as meshdemo" in out, out[-4000:]
    assert "native ssh: meshdemo" in out, out[-4000:]
