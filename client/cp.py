"""`meshssh cp SRC... DST`: scp-like copies to and from peers, over SFTP.

Paths: `[user@]host:path` is remote (as scp: a colon before any slash), anything else
local. Either all sources are on one peer and DST is local (download), or all sources
are local and DST is on a peer (upload). `-r` copies directories. A progress bar
(rich) is drawn when stdout is a terminal; `-q` turns it off.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from typing import Any

from .errors import ClientError, UsageError


@dataclass(frozen=True)
class CpPath:
    user: str | None
    host: str | None  # None: local
    path: str

    @property
    def remote(self) -> bool:
        return self.host is not None


def parse_cp_path(text: str) -> CpPath:
    """scp's rule: a ':' before the first '/' makes it remote; './a:b' stays local."""
    if text.startswith("["):  # [ipv6]:path
        end = text.find("]:")
        if end > 0:
            hostpart, path = text[1:end], text[end + 2:]
            return CpPath(None, hostpart, path)
    colon = text.find(":")
    slash = text.find("/")
    if colon <= 0 or (0 <= slash < colon):
        return CpPath(None, None, text)
    hostpart, path = text[:colon], text[colon + 1:]
    user, _, host = hostpart.rpartition("@")
    if not host:
        raise UsageError(f"bad remote path {text!r}")
    return CpPath(user or None, host, path)


def plan(paths: list[str]) -> tuple[list[CpPath], CpPath, str]:
    """(sources, destination, direction 'up'|'down') or UsageError."""
    if len(paths) < 2:
        raise UsageError("usage: meshssh cp [-r] [-P port] SRC... DST")
    parsed = [parse_cp_path(p) for p in paths]
    srcs, dst = parsed[:-1], parsed[-1]
    if dst.remote:
        if any(s.remote for s in srcs):
            raise UsageError("copying between two remote paths is not supported; copy via local")
        return srcs, dst, "up"
    if not all(s.remote for s in srcs):
        raise UsageError("no remote path: one side must be [user@]host:path")
    hosts = {(s.user, s.host) for s in srcs}
    if len(hosts) != 1:
        raise UsageError("all remote sources must be on the same peer")
    return srcs, dst, "down"


class _Progress:
    """A rich progress bar per file, only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def handler(self, src: bytes, dst: bytes, copied: int, total: int) -> None:
        if self.bar is None:
            return
        name = os.path.basename(os.fsdecode(src)) or os.fsdecode(src)
        key = os.fsdecode(src)
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(name, total=total)
        self.bar.update(self.tasks[key], completed=copied, total=total)


def check_local(srcs: list[CpPath], dst: CpPath, direction: str, *, recursive: bool) -> None:
    """Refuse what cannot work on this machine before dialling, naming the path as scp
    does; asyncssh would fail later with a bytes filename and half the copy done."""
    if direction == "up":
        for s in srcs:
            if not os.path.lexists(s.path):
                raise ClientError(f"{s.path}: No such file or directory")
            if os.path.isdir(s.path) and not recursive:
                raise ClientError(f"{s.path}: is a directory (use -r)")
        return
    into_dir = len(srcs) > 1 or dst.path.endswith("/")
    if into_dir and not os.path.isdir(dst.path):
        raise ClientError(f"{dst.path}: No such directory")
    parent = os.path.dirname(os.path.abspath(dst.path))
    if not into_dir and not os.path.isdir(dst.path) and not os.path.isdir(parent):
        raise ClientError(f"{parent}: No such directory")


async def _copy(method: Any, src: str, dst: str, *, local: str, remote: str, recursive: bool,
                preserve: bool, progress: Any) -> None:
    """One source at a time, so that a failure names the path it is about: an SFTP status
    is the peer's side (`host:path`), an OSError this machine's (asyncssh's own filename,
    which is bytes, decoded)."""
    import asyncssh

    try:
        await method(src, dst, recurse=recursive, preserve=preserve, progress_handler=progress)
    except asyncssh.SFTPError as exc:
        raise ClientError(f"{remote}: {exc.reason or 'failed'}") from exc
    except OSError as exc:
        name = os.fsdecode(exc.filename) if exc.filename is not None else local
        raise ClientError(f"{name}: {exc.strerror or exc}") from exc


async def run_cp(paths: list[str], *, recursive: bool, port: int | None, preserve: bool,
                 quiet: bool, bind_address: str | None, session: Any) -> int:
    import asyncssh

    from .connect import dial_verified
    from .target import choose_source_address, resolve

    srcs, dst, direction = plan(paths)
    check_local(srcs, dst, direction, recursive=recursive)
    remote = dst if direction == "up" else srcs[0]
    target = await asyncio.to_thread(resolve, remote.host, session, port, remote.user)
    source = choose_source_address(bind_address, session.login.management_url, exclude=target.address)
    conn = await dial_verified(target, session, source=source, quiet=quiet)
    show = (not quiet) and sys.stdout.isatty()
    async with conn:
        try:
            sftp = await conn.start_sftp_client()
        except (asyncssh.ChannelOpenError, asyncssh.SFTPError) as exc:
            raise ClientError(f"{target.name}: SFTP refused ({getattr(exc, 'reason', exc)}); is "
                              "--enable-ssh-sftp on for that peer?") from exc
        async with sftp:
            with _Progress(show) as prog:
                if direction == "up":
                    into = dst.path or "."
                    if (len(srcs) > 1 or into.endswith("/")) and not await sftp.isdir(into):
                        why = "Not a directory" if await sftp.exists(into) else "No such directory"
                        raise ClientError(f"{target.name}:{dst.path}: {why}")
                    for s in srcs:
                        await _copy(sftp.put, s.path, dst.path or ".", local=s.path,
                                    remote=f"{target.name}:{dst.path or '.'}", recursive=recursive,
                                    preserve=preserve, progress=prog.handler)
                else:
                    for s in srcs:
                        await _copy(sftp.get, s.path or ".", dst.path, local=dst.path,
                                    remote=f"{target.name}:{s.path or '.'}", recursive=recursive,
                                    preserve=preserve, progress=prog.handler)
    return 0


def main_cp(paths: list[str], *, recursive: bool, port: int | None, preserve: bool, quiet: bool,
            bind_address: str | None, ttl: str | None, no_cache: bool) -> int:
    from .auth import Session, parse_ttl

    try:
        session = Session(ttl=parse_ttl(ttl), no_cache=no_cache)
        return asyncio.run(run_cp(paths, recursive=recursive, port=port, preserve=preserve,
                                  quiet=quiet, bind_address=bind_address, session=session))
    except ClientError as exc:
        sys.stderr.write(f"meshssh: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
