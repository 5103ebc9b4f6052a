"""Reading passwords for the command-line tools (`meshssh passwd`, `meshmgmt users
set-password`): asked on the terminal without echo, or read from stdin for scripts
(`--password-stdin`, one per line), never taken from an argument, which `ps` shows.

Shared here, beside `completion`, because both tools need the same refusals: no
terminal and no `--password-stdin`, too few lines, two entries that differ.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Sequence


class PasswordInputError(Exception):
    """What the person must do differently; shown as is."""


def read_passwords(prompts: Sequence[str], *, from_stdin: bool, confirm_last: bool = True) -> list[str]:
    """One password per prompt. From the terminal, the last one is asked twice
    (`confirm_last`): a typo there would lock its owner out."""
    if from_stdin:
        lines = [sys.stdin.readline() for _ in prompts]
        if not lines[-1]:
            what = " and ".join(p.rstrip(": ").lower() for p in prompts)
            raise PasswordInputError(f"--password-stdin expects {len(prompts)} line(s) on stdin: {what}")
        return [line.rstrip("\r\n") for line in lines]
    if not sys.stdin.isatty():
        raise PasswordInputError("no terminal to ask for the password on; "
                                 "pipe it instead with --password-stdin (one per line)")
    answers = [getpass.getpass(prompt) for prompt in prompts]
    if confirm_last and getpass.getpass(f"Retype {prompts[-1][:1].lower()}{prompts[-1][1:]}") != answers[-1]:
        raise PasswordInputError("the two entries differ; nothing was changed")
    return answers
