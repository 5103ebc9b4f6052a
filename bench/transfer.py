"""Bulk transfer with the real OpenSSH clients: `ssh` pipes and `sftp -b`.

Data comes from /dev/zero through a kernel pipe (`head -c N /dev/zero | ssh ...`) or
from a sparse file on tmpfs, so no Python and no disk sits in the measured path: the
only work is the client, the server and the user's `cat`/`head`/`sftp-server`.
Every sample is one wall-clock time of one client process (connection set-up included;
it is a few ms against seconds of transfer).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .servers import Server, Workspace

CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com")


def ssh_base(ws: Workspace, server: Server, *extra: str) -> list[str]:
    """Native ssh with our key only: -F /dev/null keeps any ssh_config.d drop-in
    (for example meshssh's) and the user's config out of the measurement."""
    return [
        "ssh", "-F", "/dev/null", "-p", str(server.port), "-i", str(ws.key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", "-o", "Compression=no",
        *extra, f"{ws.user}@{server.host}",
    ]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, what: str, err: bytes = b"") -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {err.decode(errors='replace')[-400:]}")


def upload(ws: Workspace, server: Server, cipher: str, size: int) -> float:
    """`head -c SIZE /dev/zero | ssh host 'cat > /dev/null'`; returns seconds."""
    src = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            ssh_base(ws, server, "-c", cipher) + ["cat > /dev/null"],
            stdin=src.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800,
        )
    finally:
        assert src.stdout is not None
        src.stdout.close()
        src.wait()
    dt = time.perf_counter() - t0
    _check(done, f"upload to {server.label}", done.stderr)
    return dt


def download(ws: Workspace, server: Server, cipher: str, size: int) -> float:
    """`ssh host 'head -c SIZE /dev/zero' > /dev/null`; returns seconds."""
    t0 = time.perf_counter()
    done = subprocess.run(
        ssh_base(ws, server, "-c", cipher) + [f"head -c {size} /dev/zero"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800,
    )
    dt = time.perf_counter() - t0
    _check(done, f"download from {server.label}", done.stderr)
    return dt


def sparse_file(path: Path, size: int) -> Path:
    """A file of `size` zero bytes that takes no memory (a hole on tmpfs)."""
    with open(path, "wb") as f:
        f.truncate(size)
    os.chmod(path, 0o644)
    return path


def _sftp(ws: Workspace, server: Server, batch: str, cipher: str) -> float:
    batch_file = ws.tmp / "sftp.batch"
    batch_file.write_text(batch)
    argv = [
        "sftp", "-F", "/dev/null", "-P", str(server.port), "-i", str(ws.key), "-b", str(batch_file),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-c", cipher,
        f"{ws.user}@{server.host}",
    ]
    t0 = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=1800)
    dt = time.perf_counter() - t0
    _check(done, f"sftp with {server.label}", done.stderr)
    return dt


def sftp_put(ws: Workspace, server: Server, src: Path, cipher: str) -> float:
    """Upload a sparse tmpfs file into the user's tmpfs directory; the copy is removed
    in the same batch (after the timed transfer it costs nothing: tmpfs unlink)."""
    dest = ws.user_scratch / f"put-{server.label}"
    return _sftp(ws, server, f"put {src} {dest}\nrm {dest}\n", cipher)


def sftp_get(ws: Workspace, server: Server, src: Path, cipher: str) -> float:
    """Download the sparse tmpfs file to /dev/null on our side."""
    return _sftp(ws, server, f"get {src} /dev/null\n", cipher)
