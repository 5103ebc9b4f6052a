"""The issuer's key-encryption secret file and the sealing of private keys at rest."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from meshmgmt.idp import sealing
from meshmgmt.idp.keys import generate_key, kid_of, private_key_from_der, private_key_to_der
from meshmgmt.idp.secret import KeySecretError, create_key_secret, load_or_create_key_secret, read_key_secret

SECRET = bytes(range(32))


def test_secret_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "issuer.secret"
    assert read_key_secret(path) is None
    value = load_or_create_key_secret(path)
    assert len(value) == 32 and os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_key_secret(path) == value  # loaded, never replaced
    with pytest.raises(FileExistsError):
        create_key_secret(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660])
def test_secret_file_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "issuer.secret"
    create_key_secret(path)
    os.chmod(path, mode)
    with pytest.raises(KeySecretError, match="chmod 600"):
        read_key_secret(path)


@pytest.mark.parametrize(("content", "why"), [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(base64.urlsafe_b64encode(bytes(16)) + b"\n", "too-short", id="too-short"),
    pytest.param(b"not base64 at all!!\n", "garbage", id="garbage"),
])
def test_a_file_that_is_not_a_secret_is_refused(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "issuer.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(KeySecretError, match="is not an issuer key secret"):
        read_key_secret(path)


def test_a_symlinked_secret_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    create_key_secret(real)
    link = tmp_path / "issuer.secret"
    link.symlink_to(real)
    with pytest.raises(KeySecretError, match="cannot open"):
        read_key_secret(link)
    with pytest.raises(OSError):
        create_key_secret(link)


def test_seal_roundtrip_and_what_breaks_it() -> None:
    key = generate_key(0.0)
    sealed = sealing.seal(SECRET, private_key_to_der(key.private_key), kid=key.kid, alg=key.alg)
    assert sealed.startswith("mgk1:")
    assert kid_of(private_key_from_der(sealing.unseal(SECRET, sealed, kid=key.kid, alg=key.alg))) == key.kid
    other = generate_key(0.0)
    cases = {
        "wrong-secret": lambda: sealing.unseal(bytes(32), sealed, kid=key.kid, alg=key.alg),
        # a blob copied onto another row (its kid is the associated data) does not open
        "swapped-row": lambda: sealing.unseal(SECRET, sealed, kid=other.kid, alg=key.alg),
        "alg-edited": lambda: sealing.unseal(SECRET, sealed, kid=key.kid, alg="ES256"),
        "tampered": lambda: sealing.unseal(SECRET, sealed[:-4] + ("AAAA" if sealed[-4:] != "AAAA" else "BBBB"),
                                           kid=key.kid, alg=key.alg),
        "plaintext": lambda: sealing.unseal(SECRET, "-----BEGIN PRIVATE KEY-----", kid=key.kid, alg=key.alg),
    }
    for name, attempt in cases.items():
        with pytest.raises(sealing.UnsealError):
            attempt()
            pytest.fail(name)
