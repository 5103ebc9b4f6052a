"""The man pages in deploy/man/man1/ are what the CLIs say (scripts/gen-man.py regenerates them
and compares), and the wheel installs them under share/man/man1."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import REPO


def test_man_pages_match_the_clis() -> None:
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-man.py"), "--check"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    pages = {p.name for p in (REPO / "deploy" / "man" / "man1").glob("*.1")}
    assert {"meshssh.1", "meshmgmt.1", "meshsshd.1", "meshsshd-up.1", "meshmgmt-serve.1",
            "meshssh-cp.1"} <= pages


def test_the_wheel_installs_the_man_pages(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("meshsshd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".data/data/share/man/man1/meshssh.1") for n in names), names[-20:]


def test_the_units_point_at_pages_that_exist() -> None:
    """`Documentation=` of the systemd units names man pages we ship (it was a made-up URL)."""
    import re

    pages = {p.stem for p in (REPO / "deploy" / "man" / "man1").glob("*.1")}
    for unit in ("meshsshd.service", "meshmgmt.service"):
        text = (REPO / "deploy" / unit).read_text()
        docs = re.findall(r"man:([\w-]+)\(1\)", re.search(r"^Documentation=(.*)$", text, re.M)[1])
        assert docs and set(docs) <= pages, (unit, docs)
