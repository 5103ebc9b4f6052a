"""What the figures were measured on: CPU, cores, kernel, load, and the versions of
everything in the data path. Ratios are only comparable between runs on similar machines."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _openssh() -> str:
    done = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (done.stderr or done.stdout).strip()


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def describe() -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": _mem_total(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "asyncssh": _version("asyncssh"),
        "cryptography": _version("cryptography"),
        "uvloop": _version("uvloop"),
        "meshsshd": _version("meshsshd"),
        "openssh": _openssh(),
        "git_commit": _git_commit(),
        "loadavg_start": os.getloadavg(),
    }


def one_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
            f"asyncssh {m['asyncssh']}, cryptography {m['cryptography']}, {m['openssh']}, "
            f"uvloop {m['uvloop'] or 'not installed'}, commit {m['git_commit']}")
