"""Detached sessions from the client: `exec --detach`, `-d`, `sessions`, `attach`, `receive`.

PowerShell remoting's `-InDisconnectedSession`, `Get-PSSession`, `Connect-PSSession`,
`Receive-PSSession` and `Remove-PSSession`, for mesh peers. Every command dials the
peer exactly as `meshssh host` does (`target.resolve` + `connect.dial_verified`: per-peer SSH
token, host key from management, source address) and opens the reserved subsystem
`meshsshd-sessions@meshsshd`: one JSON request line, one JSON answer line, then for
`receive`/`attach` the session's output (stderr apart) and its exit status
(protocol: meshsshd/detached/__init__.py, user docs: docs/remoting-sessions.md).

`attach` puts a terminal in raw mode and relays keys; Ctrl-\\ (0x1c) detaches and leaves
the session running. Window size changes travel as SSH window-change requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from .errors import ClientError

if TYPE_CHECKING:
    from .fanout import ExecRequest
    from .options import SSHArgs

SUBSYSTEM = "meshsshd-sessions@meshsshd"
DETACH_KEY = b"\x1c"   # Ctrl-\


@dataclass(frozen=True)
class Where:
    """Which peer, as whom, from where."""

    host: str
    user: str | None = None
    port: int | None = None
    bind_address: str | None = None
    quiet: bool = False


def split_destination(dest: str, user: str | None) -> tuple[str, str | None]:
    """`user@host` → (host, user); an explicit -l wins, as in ssh."""
    if "@" in dest:
        u, _, host = dest.rpartition("@")
        return host, user or u
    return dest, user


def format_table(sessions: list[dict[str, Any]], now: float | None = None) -> list[str]:
    """`meshssh sessions` rows: ID, STATE, EXIT, STARTED (UTC), COMMAND."""
    rows = [f"{'ID':<12}  {'STATE':<8}  {'EXIT':<6}  {'STARTED (UTC)':<19}  COMMAND"]
    for s in sessions:
        exit_ = (f"SIG{s['exit_signal']}" if s.get("exit_signal")
                 else "" if s.get("exit_status") is None else str(s["exit_status"]))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(s.get("started") or 0)))
        command = s.get("command") if s.get("command") is not None else "(login shell)"
        if s.get("pty"):
            command += "  [pty]"
        rows.append(f"{s.get('id', ''):<12}  {s.get('state', ''):<8}  {exit_:<6}  {started:<19}  {command}")
    return rows


def exit_code_of(process: Any) -> int:
    """The session's exit status as ours (255 for a signal or no status, as ssh)."""
    if process.exit_signal is not None:
        return 255
    return 255 if process.exit_status is None else int(process.exit_status)


class _Peer:
    """One authenticated connection to a peer."""

    def __init__(self, where: Where) -> None:
        self.where = where
        self.conn: Any = None
        self.name = where.host

    async def __aenter__(self) -> _Peer:
        from .auth import Session
        from .connect import dial_verified
        from .target import choose_source_address, resolve

        session = await asyncio.to_thread(Session)
        target = await asyncio.to_thread(resolve, self.where.host, session, self.where.port, self.where.user)
        self.name = target.name
        source = choose_source_address(self.where.bind_address, session.login.management_url,
                                       exclude=target.address)
        self.conn = await dial_verified(target, session, source=source, quiet=self.where.quiet)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.conn is not None:
            self.conn.close()
            with contextlib.suppress(Exception):
                await self.conn.wait_closed()

    async def request(self, doc: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Open the subsystem, send the request, return (process, answer)."""
        import asyncssh

        try:
            process = await self.conn.create_process(subsystem=SUBSYSTEM, encoding=None, request_pty=False)
        except asyncssh.ChannelOpenError as exc:
            raise ClientError(f"{self.name}: session refused: {exc.reason}") from exc
        process.stdin.write(json.dumps(doc).encode() + b"\n")
        line = await process.stdout.readline()
        if not line:
            stderr = (await process.stderr.read()).decode(errors="replace").strip()
            raise ClientError(f"{self.name}: detached sessions are not supported by this peer"
                              + (f" ({stderr})" if stderr else ""))
        try:
            answer = json.loads(line)
        except ValueError:
            raise ClientError(f"{self.name}: bad answer from the peer") from None
        if not answer.get("ok"):
            process.close()
            raise ClientError(f"{self.name}: {answer.get('error', 'request refused')}")
        return process, answer

    async def simple(self, doc: dict[str, Any]) -> dict[str, Any]:
        process, answer = await self.request(doc)
        process.stdin.write_eof()
        await process.wait_closed()
        return answer


def _run(coro: Any) -> int:
    try:
        return asyncio.run(coro)
    except ClientError as exc:
        sys.stderr.write(f"meshssh: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        for fd in (0, 1, 2):
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)


# ---------------------------------------------------------------- start

async def start(where: Where, command: str | None, *, pty: bool) -> str:
    doc: dict[str, Any] = {"op": "start", "command": command, "pty": pty}
    if pty:
        size = os.get_terminal_size(0) if os.isatty(0) else os.terminal_size((80, 24))
        doc.update(term=os.environ.get("TERM", "xterm"), cols=size.columns, rows=size.lines)
    async with _Peer(where) as peer:
        answer = await peer.simple(doc)
    return str(answer["id"])


def exec_detached(req: ExecRequest) -> int:
    """`meshssh exec --detach HOST -- command`: start and print `host id` per host."""
    async def run() -> int:
        code = 0
        for host in req.hosts:
            name, user = split_destination(host, req.user)
            try:
                sid = await start(Where(name, user, req.port, req.bind_address, req.quiet), req.command, pty=False)
            except ClientError as exc:
                sys.stderr.write(f"meshssh: {exc}\n")
                code = exc.exit_code
                continue
            sys.stdout.write(f"{sid}\n" if len(req.hosts) == 1 else f"{host} {sid}\n")
            sys.stdout.flush()
        return code
    return _run(run())


def attach_hint(args: SSHArgs, sid: str) -> str:
    """The `attach` command line that reaches the same session: same login, same port."""
    port = f"-p {args.port} " if args.port else ""
    dest = f"{args.user}@{args.destination}" if args.user else args.destination
    return f"meshssh attach {port}{dest} {sid}"


def main_detached_ssh(args: SSHArgs) -> int:
    """`meshssh -d [user@]host [command]`: a detached session with a PTY; print its id."""
    async def run() -> int:
        where = Where(args.destination, args.user, args.port, args.bind_address, args.quiet)
        sid = await start(where, args.remote_command, pty=args.tty >= 0)
        sys.stdout.write(f"{sid}\n")
        if sys.stderr.isatty() and not args.quiet:
            sys.stderr.write(f"Attach with: {attach_hint(args, sid)}\n")
        return 0
    return _run(run())


# ---------------------------------------------------------------- list / kill

async def list_sessions(where: Where) -> list[dict[str, Any]]:
    async with _Peer(where) as peer:
        answer = await peer.simple({"op": "list"})
    return list(answer.get("sessions") or [])


async def kill(where: Where, sid: str) -> str:
    async with _Peer(where) as peer:
        answer = await peer.simple({"op": "kill", "id": sid})
    return str(answer.get("result", ""))


# ---------------------------------------------------------------- receive

async def _copy_out(process: Any) -> None:
    async def pump(stream: Any, fd: int) -> None:
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                return
            await asyncio.to_thread(_write_all, fd, chunk)
    await asyncio.gather(pump(process.stdout, 1), pump(process.stderr, 2))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        view = view[n:]


async def receive(where: Where, sid: str, follow: bool) -> int:
    async with _Peer(where) as peer:
        process, _answer = await peer.request({"op": "receive", "id": sid, "follow": follow})
        process.stdin.write_eof()
        await _copy_out(process)
        await process.wait_closed()
        return exit_code_of(process)


# ---------------------------------------------------------------- attach

async def attach(where: Where, sid: str) -> int:
    from .terminal import RawTerminal

    tty = os.isatty(0)
    size = os.get_terminal_size(0) if tty else os.terminal_size((80, 24))
    async with _Peer(where) as peer:
        process, answer = await peer.request({"op": "attach", "id": sid, "cols": size.columns, "rows": size.lines})
        loop = asyncio.get_running_loop()
        detached = asyncio.Event()
        stdin_open = True

        def key_in() -> None:
            nonlocal stdin_open
            try:
                data = os.read(0, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(0)
                stdin_open = False
                return
            if tty and DETACH_KEY in data:
                before = data.split(DETACH_KEY, 1)[0]
                if before:
                    process.stdin.write(before)
                detached.set()
                return
            process.stdin.write(data)

        def winch() -> None:
            with contextlib.suppress(OSError, Exception):
                sz = os.get_terminal_size(0)
                process.change_terminal_size(sz.columns, sz.lines)

        raw = RawTerminal(0) if tty and answer.get("pty") else contextlib.nullcontext()
        with raw:
            os.set_blocking(0, False)
            loop.add_reader(0, key_in)
            if tty:
                loop.add_signal_handler(signal.SIGWINCH, winch)
            copy = asyncio.ensure_future(_copy_out(process))
            waiter = asyncio.ensure_future(detached.wait())
            try:
                await asyncio.wait({copy, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if stdin_open:
                    loop.remove_reader(0)
                if tty:
                    loop.remove_signal_handler(signal.SIGWINCH)
                os.set_blocking(0, True)
        if detached.is_set():
            copy.cancel()
            process.close()
            sys.stderr.write(f"\r\n[detached from session {sid}; it keeps running]\r\n")
            return 0
        waiter.cancel()
        await process.wait_closed()
        if process.exit_status is None and process.exit_signal is None:
            sys.stderr.write(f"\r\n[session {sid} detached]\r\n")
            return 0
        return exit_code_of(process)


# ---------------------------------------------------------------- click commands

def _where_options(f: Any) -> Any:
    f = click.option("-b", "bind_address", default=None, help="source address (your peer's mesh IP)")(f)
    f = click.option("-p", "port", type=int, default=None, help="peer port (default 22022)")(f)
    f = click.option("-l", "user", default=None, help="log in as this user on the peer")(f)
    return f


@click.command("sessions")
@_where_options
@click.option("--kill", "kill_id", metavar="ID", default=None,
              help="end a running session (a finished one is forgotten)")
@click.option("--json", "as_json", is_flag=True, help="the list as JSON")
@click.argument("destination")
def sessions_command(user: str | None, port: int | None, bind_address: str | None, kill_id: str | None,
                     as_json: bool, destination: str) -> None:
    """List your detached sessions on a peer (or --kill one)."""
    host, user = split_destination(destination, user)
    where = Where(host, user, port, bind_address)
    if kill_id:
        async def do_kill() -> int:
            result = await kill(where, kill_id)
            click.echo(f"{kill_id}: {result}", err=True)
            return 0
        sys.exit(_run(do_kill()))

    async def do_list() -> int:
        lst = await list_sessions(where)
        if as_json:
            click.echo(json.dumps(lst, indent=1))
        else:
            for row in format_table(lst):
                click.echo(row)
        return 0
    sys.exit(_run(do_list()))


@click.command("attach")
@_where_options
@click.argument("destination")
@click.argument("session_id")
def attach_command(user: str | None, port: int | None, bind_address: str | None, destination: str,
                   session_id: str) -> None:
    """Reconnect to a detached session. Ctrl-\\ detaches again (the session keeps running).

    Exit status: the session's when it ends while attached, 0 after detaching."""
    host, user = split_destination(destination, user)
    sys.exit(_run(attach(Where(host, user, port, bind_address), session_id)))


@click.command("receive")
@_where_options
@click.option("-f", "--follow", is_flag=True, help="keep printing new output until the session ends")
@click.argument("destination")
@click.argument("session_id")
def receive_command(user: str | None, port: int | None, bind_address: str | None, follow: bool,
                    destination: str, session_id: str) -> None:
    """Print a detached session's output so far (stderr apart).

    Exit status: the session's once it has ended, else 0."""
    host, user = split_destination(destination, user)
    sys.exit(_run(receive(Where(host, user, port, bind_address), session_id, follow)))


COMMANDS = (sessions_command, attach_command, receive_command)

__all__ = ["COMMANDS", "DETACH_KEY", "SUBSYSTEM", "exec_detached", "format_table", "main_detached_ssh",
           "split_destination"]
