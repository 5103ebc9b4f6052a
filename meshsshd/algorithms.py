"""Explicit algorithm allowlists for the SSH listener.

asyncssh's defaults still offer SHA-1 key exchange, `ssh-rsa` signatures, CBC ciphers and
SHA-1 MACs for compatibility. A mesh peer only talks to current clients (OpenSSH >= 8.x,
asyncssh, PuTTY >= 0.80), so everything is listed explicitly here, strongest first, and
`ssh-audit` reports nothing beyond post-quantum notes. Strict KEX (Terrapin) is always on
in asyncssh >= 2.14.2; the `kex-strict-s-v00@openssh.com` marker is added by asyncssh.
"""

from __future__ import annotations

from typing import Any

# Post-quantum hybrid first (OpenSSH 10 prefers it), then curve25519, then finite-field
# groups of 4096 bits and more for clients without curve25519. No NIST-curve ECDH, no
# group-exchange. README and docs/server.md list exactly these (tests/unit/test_docs_algorithms.py).
KEX_ALGS: tuple[str, ...] = (
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
)

# AEAD first; CTR only with the encrypt-then-MAC MACs below.
ENCRYPTION_ALGS: tuple[str, ...] = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)

# Encrypt-then-MAC with SHA-2 or UMAC-128 only (64-bit tags and SHA-1 are gone).
MAC_ALGS: tuple[str, ...] = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
)

# Encrypt-and-MAC SHA-2, after the EtM ones as in OpenSSH's default server list: libssh2
# before 1.11 (Debian 12's curl) knows no -etm MAC and found nothing in common.
# `strict_algorithms = true` drops them (ssh-audit notes encrypt-and-MAC, as for sshd).
COMPAT_MAC_ALGS: tuple[str, ...] = (
    "hmac-sha2-256",
    "hmac-sha2-512",
)

COMPRESSION_ALGS: tuple[str, ...] = ("none",)

# Signatures accepted from clients (public-key auth) and used with the host keys: RSA only
# with SHA-2, never `ssh-rsa` (SHA-1).
SIGNATURE_ALGS: tuple[str, ...] = (
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)

FORBIDDEN_MARKERS: tuple[str, ...] = ("sha1", "md5", "cbc", "arcfour", "3des", "ssh-rsa", "ssh-dss", "group1-", "group14", "umac-64", "-96")


def mac_algs(strict: bool) -> tuple[str, ...]:
    """The MACs offered: EtM only when `strict`, else also the encrypt-and-MAC SHA-2 pair."""
    return MAC_ALGS if strict else MAC_ALGS + COMPAT_MAC_ALGS


def listen_options(strict: bool) -> dict[str, Any]:
    """Keyword arguments for `asyncssh.listen` that pin every negotiated algorithm."""
    return {
        "kex_algs": list(KEX_ALGS),
        "encryption_algs": list(ENCRYPTION_ALGS),
        "mac_algs": list(mac_algs(strict)),
        "compression_algs": list(COMPRESSION_ALGS),
        "signature_algs": list(SIGNATURE_ALGS),
    }


def weak_names(names: tuple[str, ...] | list[str]) -> list[str]:
    """The names in `names` that look weak (used by tests and as a guard at startup)."""
    out = []
    for name in names:
        low = name.lower()
        if low in ("rsa-sha2-256", "rsa-sha2-512"):
            continue
        if any(m in low for m in FORBIDDEN_MARKERS):
            out.append(name)
    return out


def host_keypairs(keys: list[Any] | tuple[Any, ...]) -> list[Any]:
    """Key pairs for `server_host_keys` that advertise only allowlisted signature names.

    asyncssh offers every signature an RSA key can make (`ssh-rsa` with SHA-1 and the
    `@ssh.com` variants); `signature_algs` does not restrict host-key algorithms, so the
    key pairs' own lists are narrowed here.
    """
    import asyncssh

    allowed = {a.encode() for a in SIGNATURE_ALGS}
    pairs = asyncssh.load_keypairs(list(keys))
    for kp in pairs:
        kp.host_key_algorithms = tuple(a for a in kp.host_key_algorithms if a in allowed)
        kp.sig_algorithms = tuple(a for a in kp.sig_algorithms if a in allowed)
        if kp.sig_algorithms and kp.sig_algorithm not in kp.sig_algorithms:
            # An RSA pair starts out signing with ssh-rsa (SHA-1); key exchange re-sets it
            # to what was negotiated, but a hostkeys-prove-00 answer for a key the
            # exchange did not use signs with this one, and OpenSSH refuses SHA-1 there.
            kp.set_sig_algorithm(kp.sig_algorithms[0])
    return [kp for kp in pairs if kp.host_key_algorithms]
