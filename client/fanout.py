"""`meshssh exec`: one command on many peers at once (PowerShell's `Invoke-Command`).

    meshssh exec [-l user] --hosts a,b,group:web [--throttle 32] [--timeout S] [--json] -- command

The shape of a run, outside in:
- `expand_hosts` (pure) turns `a,b,group:web` into peers from the user's peer list
  (`/api/me/peers`, whose entries name the groups each peer is in); a name that is
  not in the list stays as asked, so management can say why (no policy, unknown peer).
- `TokenPool` (client/tokenpool.py) asks management for every SSH token in one
  token-exchange request (up to `MAX_AUDIENCES` audiences, management's limit; an older
  management with a lower limit is asked again in halves). Tokens live about a minute, so
  a long run whose later peers would get a nearly expired token refills, again in one
  request for every peer not yet started.
- `run_fanout` dials at most `--throttle` peers at a time (asyncio semaphore), runs the
  command with stdin at /dev/null, and hands each output line, prefixed with the peer
  name, to a `Sink` as it arrives: nothing is buffered per peer in text mode. With
  `--json` each peer's output is captured up to `--max-output` bytes per stream and one
  JSON object per peer is written as soon as that peer finishes (JSON Lines), so memory
  is bounded by throttle × max-output whatever the number of peers.
- A peer that cannot be reached, refuses, or times out becomes a result with `error`;
  it never stops the others. Exit status: 0 when every peer ran the command and it
  exited 0; 1 when all were reached but some command failed; 255 when any peer could not
  be reached or refused (as `ssh` does for connection errors).

The `exec` sub-command itself (client/cli_exec.py) parses the options into an
`ExecRequest` and hands it here, or with `--detach` to `meshssh_client.detach.exec_detached`.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshsshd.netmap import SSH_PORT, PeerInfo

from .errors import AccessDenied, ClientError
from .tokenpool import PoolSession, TokenPool

if TYPE_CHECKING:
    from .auth import Session

DEFAULT_THROTTLE = 32
DEFAULT_MAX_OUTPUT = 1 << 20  # per peer and stream, --json only
MAX_LINE = 64 * 1024  # a longer "line" is emitted in pieces (bounded memory in text mode)
READ_SIZE = 32 * 1024
GROUP_PREFIX = "group:"

EXIT_OK = 0
EXIT_COMMAND_FAILED = 1
EXIT_UNREACHABLE = 255


# ---------------------------------------------------------------- pure parts

@dataclass(frozen=True)
class HostSpec:
    """One target as resolved: a peer from the list, or a name management must judge."""

    asked: str
    peer: PeerInfo | None = None

    @property
    def key(self) -> str:
        return self.peer.id if self.peer is not None else self.asked

    @property
    def name(self) -> str:
        return self.peer.name if self.peer is not None else self.asked


def split_hosts(text: Iterable[str]) -> list[str]:
    """`--hosts a,b --hosts c` → [a, b, c]; blanks dropped, order kept."""
    out: list[str] = []
    for chunk in text:
        out.extend(w.strip() for w in chunk.replace(" ", ",").split(",") if w.strip())
    return out


def read_hosts_file(text: str) -> list[str]:
    """`--hosts-file`: one or more targets per line (commas or spaces), `#` comments."""
    return split_hosts(line.split("#", 1)[0] for line in text.splitlines())


def expand_hosts(words: Sequence[str], peers: Sequence[PeerInfo]) -> tuple[list[HostSpec], list[str]]:
    """Targets in the order named, each peer once; plus problems (an empty group).

    `group:NAME` means every peer in the user's list that is in group NAME. A plain word
    is matched like `meshssh host` (name, FQDN, first label, mesh IP, id); a word that
    matches nothing is kept so that the token exchange reports management's reason.
    """
    from .peers import match_peer

    out: list[HostSpec] = []
    seen: set[str] = set()
    problems: list[str] = []

    def add(spec: HostSpec) -> None:
        if spec.key not in seen:
            seen.add(spec.key)
            out.append(spec)

    for w in words:
        if w.startswith(GROUP_PREFIX):
            group = w[len(GROUP_PREFIX):]
            members = [p for p in peers if group in p.groups]
            if not members:
                problems.append(f"{w}: no peer you may reach is in group {group}")
            for p in sorted(members, key=lambda p: (p.name, p.id)):
                add(HostSpec(asked=w, peer=p))
        else:
            add(HostSpec(asked=w, peer=match_peer(peers, w)))
    return out, problems


def split_lines(buf: bytes, final: bool = False) -> tuple[list[bytes], bytes]:
    """Complete lines (without their newline) and the rest; over-long rests are cut."""
    lines = buf.split(b"\n")
    rest = lines.pop()
    while len(rest) > MAX_LINE:
        lines.append(rest[:MAX_LINE])
        rest = rest[MAX_LINE:]
    if final and rest:
        lines.append(rest)
        rest = b""
    return lines, rest


@dataclass
class Capture:
    """At most `limit` bytes of one stream, and whether more was dropped."""

    limit: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room >= len(chunk):
            self.data += chunk
        else:
            if room > 0:
                self.data += chunk[:room]
            self.truncated = True

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass
class HostResult:
    name: str
    peer_id: str = ""
    exit_status: int | None = None
    exit_signal: str | None = None
    error: str | None = None
    started: float = 0.0
    duration: float = 0.0
    stdout: Capture | None = None
    stderr: Capture | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_status == 0

    @property
    def reached(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name, "peer_id": self.peer_id or None,
            "exit_status": self.exit_status, "exit_signal": self.exit_signal,
            "stdout": self.stdout.text() if self.stdout else "",
            "stderr": self.stderr.text() if self.stderr else "",
            "duration": round(self.duration, 3), "error": self.error,
        }
        if self.stdout and self.stdout.truncated:
            doc["stdout_truncated"] = True
        if self.stderr and self.stderr.truncated:
            doc["stderr_truncated"] = True
        return doc

    def failure_text(self) -> str:
        if self.error:
            return self.error
        if self.exit_signal:
            return f"killed by signal {self.exit_signal}"
        if self.exit_status is None:
            return "connection closed without an exit status"
        return f"exit status {self.exit_status}"


def exit_code(results: Iterable[HostResult]) -> int:
    code = EXIT_OK
    for r in results:
        if not r.reached:
            return EXIT_UNREACHABLE
        if not r.ok:
            code = EXIT_COMMAND_FAILED
    return code


def summary_lines(results: Sequence[HostResult], elapsed: float) -> list[str]:
    failed = [r for r in results if not r.ok]
    head = (f"meshssh exec: {len(results) - len(failed)} of {len(results)} peers succeeded"
            f" in {elapsed:.1f} s")
    if not failed:
        return [head]
    lines = [head + f"; {len(failed)} failed:"]
    for r in sorted(failed, key=lambda r: r.name):
        lines.append(f"  {r.name}: {r.failure_text()}")
    return lines


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit: each connection in flight is an fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft, hard


# ---------------------------------------------------------------- output

class Sink:
    """Where lines and results go. Text mode: `name: line` to stdout/stderr at once;
    JSON mode: nothing per line, one JSON object per finished peer."""

    def __init__(self, as_json: bool, width: int, out: Any = None, err: Any = None,
                 console: Any = None, route_stdout_to_console: bool = False) -> None:
        self.as_json = as_json
        self.width = width
        self.out = out if out is not None else sys.stdout.buffer
        self.err = err if err is not None else sys.stderr.buffer
        self.console = console
        self.route_stdout = route_stdout_to_console

    def _prefix(self, name: str) -> bytes:
        return f"{name:<{self.width}}: ".encode()

    def line(self, name: str, stream: str, line: bytes) -> None:
        data = self._prefix(name) + line + b"\n"
        if self.console is not None and (stream == "stderr" or self.route_stdout):
            from rich.text import Text

            self.console.print(Text(data.decode("utf-8", "replace").rstrip("\n")),
                               highlight=False, markup=False, soft_wrap=True,
                               style="red" if stream == "stderr" else None)
            return
        f = self.out if stream == "stdout" else self.err
        f.write(data)
        f.flush()

    def result(self, res: HostResult) -> None:
        if self.as_json:
            self.out.write(json.dumps(res.to_json()).encode() + b"\n")
            self.out.flush()

    def message(self, text: str) -> None:
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text(text), highlight=False, markup=False, soft_wrap=True)
        else:
            self.err.write(text.encode() + b"\n")
            self.err.flush()


class _Progress:
    """A rich progress bar on stderr when it is a terminal; otherwise nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.progress: Any = None
        self.task: Any = None
        self.failed = 0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("exec"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True, redirect_stdout=False,
                redirect_stderr=False)
            self.progress.__enter__()
            self.task = self.progress.add_task("exec", total=self.total, failed=0)
        return self

    @property
    def console(self) -> Any:
        return self.progress.console if self.progress is not None else None

    def done(self, res: HostResult) -> None:
        if not res.ok:
            self.failed += 1
        if self.progress is not None:
            self.progress.update(self.task, advance=1, failed=self.failed)

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


# ---------------------------------------------------------------- running

@dataclass(frozen=True)
class ExecRequest:
    """Everything `meshssh exec` was asked; also what `--detach` hands on."""

    hosts: tuple[str, ...]
    command: str
    user: str | None = None
    port: int | None = None
    throttle: int = DEFAULT_THROTTLE
    timeout: float | None = None
    connect_timeout: float = 30.0
    as_json: bool = False
    max_output: int = DEFAULT_MAX_OUTPUT
    quiet: bool = False
    verbose: bool = False
    bind_address: str | None = None
    detach: bool = False


async def _pump(reader: Any, name: str, stream: str, sink: Sink, cap: Capture | None) -> None:
    rest = b""
    while True:
        chunk = await reader.read(READ_SIZE)
        if not chunk:
            break
        if cap is not None:
            cap.add(chunk)
            continue
        lines, rest = split_lines(rest + chunk)
        for line in lines:
            sink.line(name, stream, line)
    if cap is None and rest:
        sink.line(name, stream, rest)


async def run_one(spec: HostSpec, req: ExecRequest, pool: TokenPool, sink: Sink,
                  source: str | None) -> HostResult:
    """Connect, run, stream; every failure becomes the result's `error`."""
    import asyncio

    import asyncssh

    from .connect import dial
    from .target import Target, default_login

    res = HostResult(name=spec.name, peer_id=spec.peer.id if spec.peer else "",
                     started=time.monotonic())
    if req.as_json:
        res.stdout, res.stderr = Capture(req.max_output), Capture(req.max_output)
    conn = None
    try:
        refused = pool.refusal(spec.key)
        if refused:
            raise AccessDenied(refused)
        if spec.peer is None:
            raise ClientError("not a peer you may reach")
        if not spec.peer.ssh_enabled:
            raise AccessDenied(f"{spec.name} is not SSH-enabled")
        target = Target(peer=spec.peer, port=req.port or SSH_PORT,
                        username=req.user or default_login())

        async def body() -> None:
            nonlocal conn
            prefetch = asyncio.ensure_future(pool.take(spec.key))
            conn = await dial(target, PoolSession(pool, spec.key), source=source,  # type: ignore[arg-type]
                              quiet=True, connect_timeout=req.connect_timeout,
                              prefetch=prefetch)
            try:
                proc = await conn.create_process(req.command, encoding=None, stdin=asyncssh.DEVNULL,
                                                 request_pty=False)
            except asyncssh.ChannelOpenError as exc:
                raise ClientError(f"session refused: {exc.reason}") from exc
            await asyncio.gather(
                _pump(proc.stdout, spec.name, "stdout", sink, res.stdout),
                _pump(proc.stderr, spec.name, "stderr", sink, res.stderr))
            await proc.wait_closed()
            res.exit_status = proc.exit_status
            if proc.exit_signal is not None:
                res.exit_signal = str(proc.exit_signal[0])
                res.exit_status = None

        if req.timeout:
            try:
                await asyncio.wait_for(body(), req.timeout)
            except asyncio.TimeoutError:
                raise ClientError(f"timed out after {req.timeout:g} s") from None
        else:
            await body()
        if res.exit_status is None and res.exit_signal is None:
            res.error = "connection closed without an exit status"
    except ClientError as exc:
        res.error = str(exc)
    except (OSError, asyncssh.Error) as exc:
        res.error = str(getattr(exc, "reason", None) or exc)
    except Exception as exc:  # noqa: BLE001 — one peer's surprise must not stop the others
        res.error = f"unexpected error: {exc!r}"
    finally:
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()
        res.duration = time.monotonic() - res.started
    return res


async def run_fanout(req: ExecRequest, session: Session, *, show_progress: bool) -> tuple[list[HostResult], list[str]]:
    """Resolve, fetch tokens, run everywhere; returns (results, warnings)."""
    import asyncio

    from .target import choose_source_address
    from .peers import PeerDirectory

    peers = await asyncio.to_thread(PeerDirectory(session).peers, True)
    specs, problems = expand_hosts(req.hosts, peers)
    if not specs:
        raise ClientError("no peers to run on" + (f" ({'; '.join(problems)})" if problems else ""))
    pool = TokenPool(lambda chunk: session.ssh_tokens(chunk, no_cache=True))
    await pool.prime([(s.key, s.name) for s in specs])
    if req.verbose:
        sys.stderr.write(f"meshssh exec: {len(specs)} peers, SSH tokens from {pool.requests} "
                         f"token-exchange request(s)\n")
    source = choose_source_address(req.bind_address, session.login.management_url)
    width = min(max(len(s.name) for s in specs), 32)
    sem = asyncio.Semaphore(max(1, req.throttle))
    results: list[HostResult] = []
    stdout_tty = sys.stdout.isatty()
    with _Progress(show_progress, len(specs)) as progress:
        sink = Sink(req.as_json, width, console=progress.console,
                    route_stdout_to_console=stdout_tty)
        for p in problems:
            sink.message(f"meshssh exec: {p}")

        async def one(spec: HostSpec) -> None:
            async with sem:
                r = await run_one(spec, req, pool, sink, source)
            sink.result(r)
            r.stdout = r.stderr = None  # written out: keep only what the summary needs
            results.append(r)
            progress.done(r)

        await asyncio.gather(*(one(s) for s in specs))
    if req.verbose and pool.requests > 1:
        sys.stderr.write(f"meshssh exec: {pool.requests} token-exchange requests in all\n")
    return results, problems


def main_exec(req: ExecRequest) -> int:
    """Entry from the CLI: returns the process exit code (see the module docstring)."""
    import asyncio
    import logging

    from .auth import Session

    logging.basicConfig(level=logging.CRITICAL, stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.CRITICAL)
    raise_fd_limit()
    started = time.monotonic()
    try:
        session = Session(ttl=0)
        show = sys.stderr.isatty() and not req.quiet
        results, _ = asyncio.run(run_fanout(req, session, show_progress=show))
    except ClientError as exc:
        sys.stderr.write(f"meshssh: {exc}\n")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    if not req.quiet:
        for line in summary_lines(results, time.monotonic() - started):
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
    return exit_code(results)


__all__ = ["ExecRequest", "HostResult", "HostSpec", "exit_code",
           "expand_hosts", "main_exec", "read_hosts_file", "run_fanout", "split_hosts", "summary_lines"]
