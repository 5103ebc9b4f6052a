#!/usr/bin/env python3
"""Write the man pages of the three commands into deploy/man/man1/ from their CLIs (click-man),
so they can never drift from `--help`: tests/unit/test_man_pages.py regenerates them and
compares. The package installs them under share/man/man1.

    .venv/bin/python scripts/gen-man.py            # rewrite deploy/man/man1/
    .venv/bin/python scripts/gen-man.py --check    # exit 1 if deploy/man/man1/ is stale
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

from click_man.core import write_man_pages

from meshssh_client.cli import SSH_USAGE, _add_heavy_commands, cli as meshssh_cli
from meshmgmt.cli import main as meshmgmt_cli
from meshsshd import __version__
from meshsshd.cli import main as meshsshd_cli

OUT = Path(__file__).resolve().parent.parent / "deploy" / "man" / "man1"   # MANPATH=deploy/man
# The pages carry the version, and this date instead of the day they were generated, so
# regenerating them is reproducible; bump both together.
DATE = "2026-12-02"


def generate(target: Path) -> None:
    _add_heavy_commands(None)
    meshssh = copy.copy(meshssh_cli)
    # meshssh's own page: what `meshssh --help` prints (its ssh-style usage), then the sub-commands
    meshssh.help = f"The ssh-compatible client of the mesh.\n\n{SSH_USAGE}"
    for name, command in (("meshssh", meshssh), ("meshmgmt", meshmgmt_cli), ("meshsshd", meshsshd_cli)):
        write_man_pages(name, command, version=__version__, target_dir=str(target), date=DATE)


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            fresh = {p.name: p.read_text() for p in Path(tmp).glob("*.1")}
        current = {p.name: p.read_text() for p in OUT.glob("*.1")}
        if fresh != current:
            stale = sorted(set(fresh) ^ set(current) | {n for n in fresh if current.get(n) != fresh[n]})
            print(f"deploy/man/man1 is stale ({', '.join(stale[:5])}...): run scripts/gen-man.py", file=sys.stderr)
            return 1
        return 0
    for old in OUT.glob("*.1"):
        old.unlink()
    OUT.mkdir(parents=True, exist_ok=True)
    generate(OUT)
    print(f"wrote {len(list(OUT.glob('*.1')))} man pages to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
