"""Test kit for meshmgmt: real `meshmgmt init` + `meshmgmt serve` subprocesses, a
throwaway PostgreSQL cluster, and small async helpers to call the API like a peer,
an admin or a user would. Nothing in the product imports this module."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshsshd.peerproof import prove, public_key_b64

from tests.support import Proc, console_script, free_port, require, require_root, wait_for_port

PG_BIN = Path("/usr/lib/postgresql")


def host_key() -> str:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@dataclass
class Mgmt:
    """One running `meshmgmt serve` (and the data dir `meshmgmt init` made)."""

    url: str
    data_dir: Path
    token: str
    proc: Proc
    database: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return admin_cli(self.url, self.data_dir / "admin.token", *args, input=input, check=check)


def admin_cli(url: str, token_file: Path, *args: str, input: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """An admin sub-command of `meshmgmt` against `url`; `check`: fail unless it exits 0."""
    argv = [console_script("meshmgmt"), "--url", url, "--token-file", str(token_file), *args]
    res = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({res.returncode}): {res.stdout}\n{res.stderr}")
    return res


def init_data_dir(data_dir: Path, database: str | None = None, email: str = "admin@example.com",
                  password: str | None = "admin-password-1") -> str:
    argv = [console_script("meshmgmt"), "init", "--data-dir", str(data_dir), "--admin-email", email]
    if password:
        argv.append("--admin-password-stdin")
    if database:
        argv += ["--database", database]
    subprocess.run(argv, check=True, capture_output=True, text=True, input=(password or "") + "\n", timeout=60)
    return (data_dir / "admin.token").read_text().strip()


def replica_data_dir(first: Path, data_dir: Path) -> Path:
    """A second replica's data dir: the files every replica must share, copied from the
    first, as docs/management.md says (issuer.secret seals the signing keys, peer-box.key
    checks registration proofs)."""
    data_dir.mkdir(mode=0o700)
    for name in ("issuer.secret", "peer-box.key"):
        shutil.copy2(first / name, data_dir / name)
    return data_dir


def start_serve(data_dir: Path, token: str, database: str | None = None, network: str = "127.77.0.0/16",
                extra: tuple[str, ...] = ("--register-burst", "10000"), log_dir: Path | None = None) -> Mgmt:
    """`log_dir`: where the server's log goes (default the data dir; elsewhere when the
    test fills the data dir's disk)."""
    port = free_port()
    argv = [console_script("meshmgmt"), "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}",
            "--network", network, *extra]
    if database:
        argv += ["--database", database]
    proc = Proc(argv, (log_dir or data_dir) / f"serve-{port}.log")
    try:
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc.popen)
    except Exception:
        print(proc.output())
        proc.stop()
        raise
    return Mgmt(f"http://127.0.0.1:{port}", data_dir, token, proc, database)


@contextlib.contextmanager
def mgmt_server(tmp: Path, database: str | None = None, **kw: Any) -> Iterator[Mgmt]:
    data_dir = tmp / "mgmt"
    token = init_data_dir(data_dir, database)
    mgmt = start_serve(data_dir, token, database, **kw)
    try:
        yield mgmt
    finally:
        mgmt.proc.stop()
    assert_no_server_errors(mgmt)


def assert_no_server_errors(mgmt: Mgmt) -> None:
    """A 500 is a bug: the server logs every unhandled error at level "error"."""
    out = mgmt.proc.log.read_text(errors="replace")
    errors = [line for line in out.splitlines() if '"level":"error"' in line or "Traceback" in line]
    assert not errors, "server logged errors:\n" + "\n".join(errors[:20])


# --- PostgreSQL -----------------------------------------------------------------------------


def _pg_bin(tool: str) -> str | None:
    if not PG_BIN.is_dir():
        return None
    for version in sorted(PG_BIN.iterdir(), reverse=True):
        candidate = version / "bin" / tool
        if candidate.exists():
            return str(candidate)
    return None


@dataclass
class PgCluster:
    port: int
    root: Path

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        subprocess.run(["runuser", "-u", "postgres", "--", _pg_bin("psql") or "psql", "-h", "127.0.0.1", "-p",
                        str(self.port), "-d", "postgres", "-q", "-c", f'CREATE DATABASE "{name}"'],
                       check=True, capture_output=True, timeout=30)
        return self.url(name)


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster owned by `postgres` in a temp dir, on a free port."""
    require_root()
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    require(initdb is not None and pg_ctl is not None, "needs PostgreSQL server binaries (apt install postgresql)")
    require(shutil.which("runuser") is not None, "needs runuser")
    root = Path(tempfile.mkdtemp(prefix="meshmgmt-pg-"))
    os.chmod(root, 0o755)
    shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    port = free_port()

    def as_pg(*argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=120)

    try:
        as_pg(initdb or "", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        as_pg(pg_ctl or "", "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
              f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
        yield PgCluster(port, root)
    finally:
        with contextlib.suppress(Exception):
            as_pg(pg_ctl or "", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


# --- API helpers ------------------------------------------------------------------------------


async def call(http: aiohttp.ClientSession, method: str, url: str, *, headers: dict | None = None,
               json: Any = None, data: Any = None, expect: int | tuple[int, ...] | None = None) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, json=json, data=data) as resp:
        text = await resp.text()
        try:
            import json as _json

            doc = _json.loads(text) if text else None
        except ValueError:
            doc = text
        if expect is not None:
            want = expect if isinstance(expect, tuple) else (expect,)
            assert resp.status in want, f"{method} {url} → {resp.status} {text[:500]}"
        return resp.status, doc


async def register_peer(http: aiohttp.ClientSession, mgmt: Mgmt, setup_key: str, hostname: str, *,
                        allow_server_ssh: bool = True, wg: X25519PrivateKey | None = None,
                        headers: dict[str, str] | None = None, expect: int = 201) -> dict[str, Any]:
    """Register as a peer does: a challenge, then the request with its proof (`_wg` in the
    answer is the WireGuard private key, to register the same key again)."""
    wg = wg or X25519PrivateKey.generate()
    body = {"setup_key": setup_key, "wg_public_key": public_key_b64(wg), "ssh_host_key": host_key(),
            "hostname": hostname, "flags": {"allow_server_ssh": allow_server_ssh}, "version": "test",
            "endpoints": ["127.0.0.1:51820"]}
    _, challenge = await call(http, "POST", mgmt.url + "/api/peers/challenge", expect=200,
                              json={"wg_public_key": body["wg_public_key"]})
    _, doc = await call(http, "POST", mgmt.url + "/api/peers/register", json=prove(body, wg, challenge),
                        headers=headers, expect=expect)
    if isinstance(doc, dict):
        doc["_wg"] = wg
    return doc


def peer_auth(peer: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Peer {peer['peer_id']}:{peer['credential']}"}


async def service_token(http: aiohttp.ClientSession, mgmt: Mgmt, user: dict[str, Any]) -> str:
    _, doc = await call(http, "POST", mgmt.url + "/oauth/token", expect=200,
                        data={"grant_type": "client_credentials", "client_id": user["client_id"],
                              "client_secret": user["client_secret"]})
    return doc["access_token"]
