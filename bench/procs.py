"""Reading /proc: a daemon's process tree, its memory (RSS and PSS) and its CPU time.

sshd forks two processes per connection while meshsshd holds connections in one process
(or a few workers), so memory and CPU are always summed over the whole tree below the
listening process. PSS (proportional set size, from /proc/PID/smaps_rollup) divides each
shared page by the number of processes mapping it; it is the fair figure for sshd, whose
forked children share most of their pages. RSS counts every shared page in every process
and so overstates a forking server; both are reported.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: split after the last ')'.
        rest = stat[stat.rfind(b")") + 2:].split()
        kids.setdefault(int(rest[1]), []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """root and all its descendants that exist right now."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


@dataclass(frozen=True)
class Memory:
    rss: int  # bytes
    pss: int  # bytes
    processes: int


def _rollup(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    rss = pss = 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


def tree_memory(root: int) -> Memory:
    rss = pss = n = 0
    for pid in process_tree(root):
        got = _rollup(pid)
        if got is None:  # exited while we walked
            continue
        rss += got[0]
        pss += got[1]
        n += 1
    return Memory(rss=rss, pss=pss, processes=n)


def _cpu(pid: int) -> float:
    """utime+stime of pid plus cutime+cstime of its reaped children, in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    rest = stat[stat.rfind(b")") + 2:].split()
    # fields 14-17 (1-based) are utime stime cutime cstime; rest starts at field 3.
    return sum(int(x) for x in rest[11:15]) / _CLK_TCK


def tree_cpu(root: int, pids: Iterable[int] | None = None) -> float:
    """CPU seconds used by the tree so far. Children that exited were reaped by a process
    of the tree and show in its cumulative child time, so a difference of two readings
    is the tree's CPU between them."""
    return sum(_cpu(p) for p in (pids if pids is not None else process_tree(root)))


class CpuGroup:
    """A cgroup (v1 cpuacct, or v2) holding one daemon and everything it forks.

    sshd's privilege-separation monitor exits without waiting for its user child, so
    that child's CPU (the one doing the crypto) is reaped by init and never appears in
    any cumulative time of the listener's tree; a cgroup counts it. Falls back to the
    /proc tree sum (`tree_cpu`) where no cgroup can be made.
    """

    V1 = Path("/sys/fs/cgroup/cpuacct")
    V2 = Path("/sys/fs/cgroup/unified")

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        for base, counter in ((self.V1, "cpuacct.usage"), (self.V2, "cpu.stat")):
            if not (base / counter).exists() and not (base / "cgroup.procs").exists():
                continue
            try:
                path = base / name
                path.mkdir()
            except OSError:
                continue
            if (path / counter).exists():
                self.path, self._counter = path, counter
                return
            with contextlib.suppress(OSError):
                path.rmdir()

    def add(self, pid: int) -> bool:
        if self.path is None:
            return False
        try:
            (self.path / "cgroup.procs").write_text(f"{pid}\n")
            return True
        except OSError:
            return False

    def seconds(self) -> float | None:
        if self.path is None:
            return None
        text = (self.path / self._counter).read_text()
        if self._counter == "cpuacct.usage":
            return int(text) / 1e9
        for line in text.splitlines():
            if line.startswith("usage_usec"):
                return int(line.split()[1]) / 1e6
        return None

    def remove(self) -> None:
        """Move any stragglers to the parent group and delete ours."""
        if self.path is None:
            return
        parent = self.path.parent / "cgroup.procs"
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    parent.write_text(f"{pid}\n")
        for _ in range(50):
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        self.path = None
