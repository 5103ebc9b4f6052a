"""Asking the person at the keyboard yes or no, the way `ssh-add -c` keys do.

The broker (client/broker.py) cannot read the terminal: while a session to B runs, the
terminal is in raw mode and every keystroke belongs to that session. So, like
ssh-agent's confirmation, the question goes to an askpass program — `$SSH_ASKPASS`,
started with `SSH_ASKPASS_PROMPT=confirm` — which opens its own window. OpenSSH's rule
for the answer is kept: the program exits 0 and prints nothing or "yes".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil

from .errors import UsageError

CONFIRM_TIMEOUT = 45.0  # no answer within this is a no; B gives up on the broker after 60 s


def askpass_program(environ: dict[str, str] | None = None) -> str:
    """The program that asks; UsageError when there is none, so that a confirmation the
    user asked for is never silently skipped."""
    env = os.environ if environ is None else environ
    name = env.get("SSH_ASKPASS", "").strip()
    path = shutil.which(name) if name else None
    if not path:
        raise UsageError("--delegate-confirm needs SSH_ASKPASS: a program that asks you on your "
                         "display (such as ssh-askpass), as ssh-add -c does"
                         + (f"; {name!r} was not found" if name else ""))
    return path


async def confirm(program: str, prompt: str, timeout: float = CONFIRM_TIMEOUT) -> bool:
    """True only for an explicit yes; a failure, a refusal or silence is a no."""
    env = {**os.environ, "SSH_ASKPASS_PROMPT": "confirm"}
    try:
        proc = await asyncio.create_subprocess_exec(
            program, prompt, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return False
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False
    answer = out.decode("utf-8", "replace").strip().lower()
    return proc.returncode == 0 and answer in ("", "yes")
