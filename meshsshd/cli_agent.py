"""`meshsshd up`, `down`, `status`: the managed peer's commands.

`up` runs the daemon in the foreground (systemd, or `&` in a shell); flags given once are
persisted in the state dir, so `meshsshd up` alone (or the systemd unit) restarts with
them. `down` stops the daemon named by the pid file and removes the interface and nft
table it recorded, even when the daemon crashed. `status` reads status.json, which the
daemon rewrites whenever something changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import event_loop
from .cli import main
from .config import DEFAULT_STATE_DIR
from .errors import MeshsshdError
from .logs import setup_logging
from .state import PUBLIC_MODE, StateDir, is_meshsshd, pid_alive, read_json, write_json

FLAG_NAMES = (
    "allow_server_ssh",
    "enable_ssh_sftp",
    "enable_ssh_local_port_forwarding",
    "enable_ssh_remote_port_forwarding",
    "enable_ssh_root",
    "disable_ssh_auth",
    "disable_ssh_agent_forwarding",
)

_state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR, show_default=True, envvar="MESHSSHD_STATE_DIR",
    help="Where keys, credential, flags, the last map and status.json live.",
)


def _flag(name: str, help_text: str):
    opt = "--" + name.replace("_", "-")
    return click.option(f"{opt}/--no-{opt[2:]}", name, default=None, help=help_text + " (persisted)")


@main.command("up")
@click.option("--management-url", help="Management server URL, e.g. http://127.0.0.1:33073.")
@click.option("--setup-key", envvar="MESHSSHD_SETUP_KEY",
              help="Setup key for the first registration (or $MESHSSHD_SETUP_KEY).")
@_flag("allow_server_ssh", "Run the SSH server on this peer")
@_flag("enable_ssh_sftp", "Allow the sftp subsystem")
@_flag("enable_ssh_local_port_forwarding", "Allow ssh -L")
@_flag("enable_ssh_remote_port_forwarding", "Allow ssh -R")
@_flag("enable_ssh_root", "Allow logins as root (when a policy maps to root)")
@_flag("disable_ssh_auth", "Accept SSH logins without a token (dangerous)")
@_flag("disable_ssh_agent_forwarding", "Refuse ssh -A agent forwarding")
@_state_dir_option
@click.option("--interface", help="Mesh interface name [mesh0].")
@click.option("--wireguard-port", type=click.IntRange(1, 65535), help="WireGuard UDP port [51820].")
@click.option("--hostname", help="Name to register with [this host's name].")
@click.option("--dataplane", type=click.Choice(["auto", "wireguard", "none"]),
              help="auto: WireGuard as root, none otherwise; none = single-machine mode.")
@click.option("--endpoint", "endpoints", multiple=True,
              help="HOST:PORT where other peers reach our WireGuard (repeatable; default: "
                   "this host's global addresses).")
@click.option("--metrics-listen", help="Serve Prometheus /metrics on HOST:PORT (off by default).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def up(management_url: str | None, setup_key: str | None, state_dir: Path, interface: str | None,
       wireguard_port: int | None, hostname: str | None, dataplane: str | None,
       endpoints: tuple[str, ...], metrics_listen: str | None, log_level: str, **flags: Any) -> None:
    """Join the mesh and serve SSH on this peer's mesh address (runs in the foreground)."""
    from . import local_peers
    from .agent import Agent
    from .dataplane._nftables import check_interface_name

    from .session import reset_inherited_signals

    setup_logging(log_level)
    reset_inherited_signals()
    state = StateDir(state_dir)
    try:
        config = state.load_config().merged(
            management_url=management_url.rstrip("/") if management_url else None,
            interface=interface, wireguard_port=wireguard_port, hostname=hostname,
            dataplane=dataplane, metrics_listen=metrics_listen,
            endpoints=list(endpoints) if endpoints else None,
            flags={k: flags.get(k) for k in FLAG_NAMES},
        )
        if not config.management_url:
            raise click.UsageError("--management-url is required the first time")
        try:
            check_interface_name(config.interface)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--interface") from exc
        agent = Agent(state, config, setup_key=setup_key)
        pointer = local_peers.publish(state)   # so meshssh here finds this peer's address
        try:
            code = event_loop.run(agent.run())
        finally:
            local_peers.withdraw(pointer)
    except MeshsshdError as exc:
        click.echo(f"meshsshd: {exc.user_message}", err=True)
        sys.exit(exc.exit_code)
    if agent.failure is not None:   # logged as JSON; the person at the terminal reads this
        click.echo(f"meshsshd: {agent.failure.user_message}", err=True)
    if code == 3:
        click.echo("meshsshd: this peer was deleted at management and stopped serving; "
                   "register again with --setup-key", err=True)
    sys.exit(code)


@main.command("down")
@_state_dir_option
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for the daemon.")
def down(state_dir: Path, timeout: float) -> None:
    """Stop the running peer and remove what it created (interface, nftables table)."""
    from .dataplane import cleanup

    state = StateDir(state_dir)
    pid = state.read_pid()
    if is_meshsshd(pid):
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            click.echo(f"meshsshd (pid {pid}) did not stop within {timeout:.0f}s; killing it", err=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)
        click.echo(f"stopped meshsshd (pid {pid})")
    else:
        click.echo("meshsshd is not running")
    # Whatever a crashed daemon left behind: its record, or what its flags imply.
    try:
        record = read_json(state.dataplane_path)
    except MeshsshdError:
        record = None
    config = state.load_config() if state.flags_path.exists() else None
    if not isinstance(record, dict) and config is not None and config.dataplane != "none" and os.geteuid() == 0:
        record = {"kind": "wireguard", "interface": config.interface}
    removed: list[str] = []
    if isinstance(record, dict):
        try:
            removed = asyncio.run(cleanup(record))
        except MeshsshdError as exc:
            click.echo(f"meshsshd: cleanup failed: {exc.user_message}", err=True)
            sys.exit(1)
    for item in removed:
        click.echo(f"removed {item}")
    with contextlib.suppress(FileNotFoundError):
        state.dataplane_path.unlink()
    with contextlib.suppress(FileNotFoundError):
        if state.read_pid() == pid:
            state.pid_path.unlink()
    doc = state.load_status() if state.status_path.exists() else None
    if doc and doc.get("state") not in ("stopped", "credential-deleted", "error"):
        doc.update(state="stopped", pid=None, serving=False, session_count=0, reason="stopped by meshsshd down")
        doc.pop("sessions", None)  # from before sessions had their own file
        with contextlib.suppress(FileNotFoundError):
            state.sessions_path.unlink()
        doc["ssh"] = {**doc.get("ssh", {}), "running": False}
        with contextlib.suppress(MeshsshdError):
            write_json(state.status_path, doc, PUBLIC_MODE)


def _ago(epoch: float) -> str:
    if not epoch:
        return "never"
    secs = int(time.time() - epoch)
    if secs < 120:
        return f"{secs}s ago"
    if secs < 7200:
        return f"{secs // 60}m ago"
    return f"{secs // 3600}h ago"


def human_status(doc: dict[str, Any]) -> str:
    """What `meshsshd status` prints (pure, so its shape is tested)."""
    lines = []
    running = doc.get("running", False)
    state = doc.get("state", "unknown")
    lines.append(f"Daemon:      {'running (pid %s)' % doc.get('pid') if running else 'not running'}, {state}")
    if doc.get("reason"):
        lines.append(f"             {doc['reason']}")
    mg = doc.get("management", {})
    conn = "connected" if mg.get("connected") else "disconnected"
    since = f" since {mg['since']}" if mg.get("since") else ""
    lines.append(f"Management:  {doc.get('management_url', '')} ({conn}{since})")
    if mg.get("last_error") and not mg.get("connected"):
        lines.append(f"             last error: {mg['last_error']}")
    lines.append(f"Peer:        {doc.get('name', '')} ({doc.get('fqdn', '')}) id {doc.get('peer_id', '')}")
    lines.append(f"Mesh IP:     {doc.get('mesh_ip', '')} in {doc.get('network', '')}")
    dp = doc.get("dataplane", {})
    dp_text = dp.get("kind", "")
    if dp.get("interface"):
        dp_text += f" on {dp['interface']}" + (" (wireguard-go)" if dp.get("userspace") else "")
    if dp.get("table"):
        dp_text += f", nftables {dp['table']}"
    lines.append(f"Data plane:  {dp_text}")
    lines.append(f"Map serial:  {doc.get('netmap_serial')}")
    if doc.get("netmap_error"):
        lines.append(f"             last map rejected: {doc['netmap_error']}")
    ssh = doc.get("ssh", {})
    flags = ssh.get("flags", {})
    on = [k for k, v in flags.items() if v]
    lines.append(f"SSH server:  {'serving on ' + ssh.get('listen', '') if ssh.get('running') else 'stopped'}"
                 f"; flags: {', '.join(on) or 'none'}")
    peers = doc.get("peers", [])
    lines.append(f"Peers ({len(peers)}):")
    for p in peers:
        hs = p.get("latest_handshake", 0)
        hs_text = _ago(hs) if dp.get("kind") == "wireguard" else "n/a"
        lines.append(f"  {p.get('name', ''):<20} {p.get('mesh_ip', ''):<16} handshake {hs_text}"
                     f"{'  ssh' if p.get('ssh_enabled') else ''}")
    names = {p.get("mesh_ip"): p.get("name") for p in peers}
    sessions = doc.get("sessions")
    if not isinstance(sessions, list):  # sessions.json is root's: a user sees the count only
        lines.append(f"Sessions ({doc.get('session_count', 0)}): who is logged in is shown to root only")
        sessions = []
    else:
        lines.append(f"Sessions ({len(sessions)}):")
    for s in sessions:
        if not isinstance(s, dict):
            lines.append(f"  {s}")
            continue
        src = s.get("source_ip") or s.get("source") or ""
        src_text = f"{names[src]} ({src})" if src in names else src
        since = f", started {_ago(float(s['started']))}" if isinstance(s.get("started"), (int, float)) else ""
        lines.append(f"  {s.get('local_user', '')} ← {s.get('identity', '')} from {src_text}: "
                     f"{s.get('kind', '')}{' (pty)' if s.get('pty') else ''}{since}")
    return "\n".join(lines)


@main.command("status")
@_state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print status.json (plus `running`).")
def status(state_dir: Path, as_json: bool) -> None:
    """Show the peer: management connection, mesh IP, peers, SSH server, sessions."""
    state = StateDir(state_dir)
    try:
        doc = state.load_status()
    except MeshsshdError as exc:
        click.echo(f"meshsshd: {exc.user_message}", err=True)
        sys.exit(1)
    if doc is None:
        if as_json:
            click.echo(json.dumps({"running": False, "state": "never-started"}))
        else:
            click.echo(f"meshsshd has not run with state directory {state.root}")
        sys.exit(1)
    sessions = state.load_sessions()
    if sessions is not None:
        doc["sessions"] = sessions
    doc["running"] = is_meshsshd(doc.get("pid")) and state.read_pid() == doc.get("pid")
    if not doc["running"] and doc.get("state") not in ("stopped", "credential-deleted", "error"):
        doc["state"] = "crashed"
        doc["reason"] = doc.get("reason") or "the daemon is gone without stopping; run meshsshd down"
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(human_status(doc))
    sys.exit(0 if doc["running"] else 3)
