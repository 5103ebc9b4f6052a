"""Signing keys in the store: load the ring, create the first key, rotate, prune.

All replicas share the keys through the database. Rotation is a compare-and-set on the
current key's row (retire it only if still unretired), so two replicas rotating at once
make one new signer, not two.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import delete, select, update

from management.store.models import aware

from .keys import KeyRing, SigningKey, generate_key, private_key_from_pem, private_key_to_pem
from .models import SigningKeyRow


def _ts(dt: datetime | None) -> float | None:
    dt = aware(dt)
    return dt.timestamp() if dt is not None else None


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


class KeyStore:
    def __init__(self, store, *, secret: bytes | None, overlap: float, alg: str = "EdDSA") -> None:
        self.store = store
        self.secret = secret
        self.overlap = overlap
        self.alg = alg

    def _from_row(self, row: SigningKeyRow) -> SigningKey:
        if row.encrypted and not self.secret:
            raise RuntimeError(
                f"signing key {row.kid} is encrypted but no key-encryption secret was given"
            )
        key = private_key_from_pem(row.private_key_pem.encode(), self.secret if row.encrypted else None)
        created = _ts(row.created)
        assert created is not None
        return SigningKey(kid=row.kid, alg=row.alg, private_key=key, created_at=created,
                          retired_at=_ts(row.retired))

    def _to_row(self, key: SigningKey) -> SigningKeyRow:
        return SigningKeyRow(
            kid=key.kid, alg=key.alg, encrypted=bool(self.secret),
            private_key_pem=private_key_to_pem(key.private_key, self.secret).decode(),
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
        `drop_previous` (a key may have leaked) the old keys stop verifying at once."""
        new = generate_key(now, self.alg)
        retired = now - self.overlap if drop_previous else now
        async with self.store.write() as s:
            await s.execute(
                update(SigningKeyRow).where(SigningKeyRow.retired.is_(None)).values(retired=_dt(retired))
            )
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
