"""Signing keys in the store: load the ring, create the first key, rotate, prune, seal.

All replicas share the keys through the database. Rotation is a compare-and-set on the
current key's row (retire it only if still unretired), so two replicas rotating at once
make one new signer, not two. Private keys are sealed with the issuer secret
(`sealing.py`) before they reach a row; a row written in the clear by an older meshmgmt
is sealed in place by `seal_plaintext` when the issuer starts.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import delete, func, select, update

from meshmgmt.store.models import aware

from . import sealing
from .keys import (KeyRing, SigningKey, generate_key, kid_of, private_key_from_der, private_key_from_pem,
                   private_key_to_der)
from .models import SigningKeyRow
from .secret import KeySecretError


def _ts(dt: datetime | None) -> float | None:
    dt = aware(dt)
    return dt.timestamp() if dt is not None else None


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


class KeyStore:
    def __init__(self, store, *, secret: bytes | None, overlap: float, alg: str = "EdDSA") -> None:
        self.store = store
        self.secret = secret  # None until the issuer resolved it (Issuer.start)
        self.overlap = overlap
        self.alg = alg

    def _secret(self) -> bytes:
        if self.secret is None:
            raise KeySecretError("the issuer has no key-encryption secret (issuer.secret)")
        return self.secret

    def _from_row(self, row: SigningKeyRow) -> SigningKey:
        if not row.encrypted:
            raise KeySecretError(f"signing key {row.kid} is stored in the clear; restart meshmgmt to seal it")
        try:
            der = sealing.unseal(self._secret(), row.private_key_pem, kid=row.kid, alg=row.alg)
        except sealing.UnsealError as exc:
            raise KeySecretError(str(exc)) from None
        key = private_key_from_der(der)
        if kid_of(key) != row.kid:
            raise KeySecretError(f"signing key {row.kid} does not match its key id")
        created = _ts(row.created)
        assert created is not None
        return SigningKey(kid=row.kid, alg=row.alg, private_key=key, created_at=created,
                          retired_at=_ts(row.retired))

    def _to_row(self, key: SigningKey) -> SigningKeyRow:
        return SigningKeyRow(
            kid=key.kid, alg=key.alg, encrypted=True,
            private_key_pem=sealing.seal(self._secret(), private_key_to_der(key.private_key), kid=key.kid,
                                         alg=key.alg),
            created=_dt(key.created_at), retired=_dt(key.retired_at) if key.retired_at else None,
        )

    async def load(self) -> KeyRing:
        async with self.store.session() as s:
            rows = (await s.execute(select(SigningKeyRow))).scalars().all()
        return KeyRing([self._from_row(r) for r in rows], self.overlap)

    async def kids(self) -> tuple[tuple[str, float | None], ...]:
        """Cheap fingerprint of the stored keys, to notice another replica's rotation."""
        async with self.store.session() as s:
            rows = (await s.execute(select(SigningKeyRow.kid, SigningKeyRow.retired))).all()
        return tuple(sorted((kid, _ts(retired)) for kid, retired in rows))

    async def has_sealed(self) -> bool:
        """Whether any stored key needs the secret (so a missing secret is fatal)."""
        async with self.store.session() as s:
            count = (await s.execute(select(func.count()).select_from(SigningKeyRow)
                                     .where(SigningKeyRow.encrypted.is_(True)))).scalar()
        return bool(count)

    async def seal_plaintext(self) -> list[str]:
        """Seal every key an older meshmgmt stored in the clear; the kids of those that
        still sign (the caller rotates them: the clear copy may live on in backups)."""
        async with self.store.session() as s:
            rows = (await s.execute(select(SigningKeyRow).where(SigningKeyRow.encrypted.is_(False)))).scalars().all()
        signing = []
        for row in rows:
            key = private_key_from_pem(row.private_key_pem.encode())
            sealed = sealing.seal(self._secret(), private_key_to_der(key), kid=row.kid, alg=row.alg)
            async with self.store.write() as s:
                done = await s.execute(
                    update(SigningKeyRow)
                    .where(SigningKeyRow.kid == row.kid, SigningKeyRow.encrypted.is_(False))
                    .values(private_key_pem=sealed, encrypted=True)
                )
                await s.commit()
            if done.rowcount == 1 and row.retired is None:
                signing.append(row.kid)
        return signing

    async def ensure(self, now: float) -> KeyRing:
        """The ring, after creating a first signing key if there is none."""
        ring = await self.load()
        try:
            ring.current()
            return ring
        except LookupError:
            pass
        async with self.store.write() as s:
            s.add(self._to_row(generate_key(now, self.alg)))
            await s.commit()
        return await self.load()

    async def rotate(self, now: float, *, drop_previous: bool = False) -> KeyRing:
        """Retire every active key and add a new one, in one transaction. With
        `drop_previous` (a key may have leaked) every older key stops verifying at once,
        including keys an earlier rotation left in their overlap."""
        new = generate_key(now, self.alg)
        if drop_previous:
            cutoff = _dt(now - self.overlap)
            stale = SigningKeyRow.retired.is_(None) | (SigningKeyRow.retired > cutoff)
        else:
            cutoff, stale = _dt(now), SigningKeyRow.retired.is_(None)
        async with self.store.write() as s:
            await s.execute(update(SigningKeyRow).where(stale).values(retired=cutoff))
            s.add(self._to_row(new))
            await s.commit()
        return await self.load()

    async def rotate_if_current(self, kid: str, now: float) -> bool:
        """Rotate only if `kid` still signs (auto-rotation from several replicas)."""
        new = generate_key(now, self.alg)
        async with self.store.write() as s:
            result = await s.execute(
                update(SigningKeyRow)
                .where(SigningKeyRow.kid == kid, SigningKeyRow.retired.is_(None))
                .values(retired=_dt(now))
            )
            if result.rowcount != 1:
                await s.rollback()
                return False
            s.add(self._to_row(new))
            await s.commit()
        return True

    async def prune(self, now: float) -> int:
        """Delete keys retired longer than the overlap ago; they verify nothing any more."""
        async with self.store.write() as s:
            result = await s.execute(
                delete(SigningKeyRow).where(
                    SigningKeyRow.retired.is_not(None), SigningKeyRow.retired <= _dt(now - self.overlap)
                )
            )
            await s.commit()
        return int(result.rowcount or 0)
