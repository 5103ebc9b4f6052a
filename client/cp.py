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


async def run_cp(paths: list[str], *, recursive: bool, port: int | None, preserve: bool,
                 quiet: bool, bind_address: str | None, session: Any) -> int:
    import asyncssh

    from .connect import choose_source_address, dial_verified, resolve

    srcs, dst, direction = plan(paths)
    remote = dst if direction == "up" else srcs[0]
    target = await asyncio.to_thread(resolve, remote.host, session, port, remote.user)
    source = choose_source_address(bind_address, session.login.management_url)
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
                try:
                    if direction == "up":
                        for s in srcs:
                            if os.path.isdir(s.path) and not recursive:
                                raise ClientError(f"{s.path}: is a directory (use -r)")
                        await sftp.put([s.path for s in srcs], dst.path or ".", recurse=recursive,
                                       preserve=preserve, progress_handler=prog.handler)
                    else:
                        await sftp.get([s.path or "." for s in srcs], dst.path, recurse=recursive,
                                       preserve=preserve, progress_handler=prog.handler)
                except (asyncssh.SFTPError, OSError) as exc:
                    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
                    fname = getattr(exc, "filename", None)
                    raise ClientError(f"{fname + ': ' if fname else ''}{reason}") from exc
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
