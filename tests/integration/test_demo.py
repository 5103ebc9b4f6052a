"""README's first command must stay true: the demo brings up management, peers and logs in,
and the commands it prints for logging in again work as printed."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.support import REPO, require_root, stop_group


def test_demo_script_runs_end_to_end_and_its_hints_work_as_printed() -> None:
    require_root()
    env = {**os.environ, "DEMO_SKIP_INSTALL": "1", "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    env.pop("DEMO_EXIT", None)
    if not (REPO / ".venv" / "bin" / "python").exists():
        env["DEMO_SKIP_INSTALL"] = "0"
    proc = subprocess.Popen([str(REPO / "scripts" / "demo.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 600
        for line in proc.stdout:
            out.append(line)
            if line.startswith("Ctrl-C stops it") or time.monotonic() > deadline:
                break
        text = "".join(out)
        assert "Ctrl-C stops it" in text, text[-4000:]
        assert "hello from" in text and "as meshdemo" in text, text[-4000:]
        assert "native ssh: meshdemo" in text, text[-4000:]
        assert "WARNING" not in text and "Warning" not in text, text   # no pip or setuptools noise
        hints = [line.strip() for line in out if line.startswith("  MESHSSH_CONFIG_DIR=")]
        assert len(hints) == 2 and "/meshssh meshdemo@server-1" in hints[0] and " ssh -F " in hints[1], hints
        for hint in hints:   # as printed, plus a command instead of an interactive shell
            r = subprocess.run(["bash", "-c", f"{hint} 'echo hint-works as $(id -un)'"], capture_output=True,
                               text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                           if not k.startswith("MESHSSH")})
            assert r.returncode == 0 and r.stdout.strip() == "hint-works as meshdemo", (hint, r.stdout, r.stderr)
    finally:
        stop_group(proc, signal.SIGINT, timeout=60)   # Ctrl-C, as a person stops it
