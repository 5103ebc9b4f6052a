"""Tables of the embedded issuer, on the store's one declarative Base.

- idp_signing_keys: the issuer's private keys, sealed with AES-256-GCM under a key
  derived from DATA_DIR/issuer.secret (`sealing.py`; the column keeps its historical
  name `private_key_pem`). Server-side only; the JWKS is derived from them.
  `retired` is when a newer key took over signing; a retired key stays published for
  the overlap period and is deleted afterwards.
- idp_device_codes: RFC 8628 grants. The device code is stored as a SHA-256 digest (it is
  a bearer secret); the user code is stored as shown ("BCDF-GHJK"), it is short-lived and
  only useful together with a password.
- idp_refresh_tokens: digests of refresh tokens. Each use marks the row `used` and adds a
  successor in the same `family`; presenting a used (or revoked) token again revokes
  the whole family (reuse detection, OAuth 2.0 Security BCP §4.14). Every token of a
  family carries the family's end (`family_expires_at`, the login time plus the absolute
  lifetime), and its own `expires_at` never passes it. `revoked_reason` says what ended
  it (`blocked`, `password-changed`, `role-changed`, `refresh-reused`…), so a client that
  presents it later is told why.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from meshmgmt.store.models import Base, Created, RowId


class SigningKeyRow(Base):
    __tablename__ = "idp_signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    private_key_pem: Mapped[str] = mapped_column(Text)
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[Created]
    retired: Mapped[datetime | None]


class DeviceCodeRow(Base):
    __tablename__ = "idp_device_codes"

    id: Mapped[RowId]
    device_code_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    user_code: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    client_id: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(255), default="")
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created: Mapped[Created]
    expires_at: Mapped[datetime]
    interval: Mapped[int] = mapped_column(Integer, default=5)
    last_polled_at: Mapped[datetime | None]
    user_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )


class RefreshTokenRow(Base):
    __tablename__ = "idp_refresh_tokens"

    id: Mapped[RowId]
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    family_id: Mapped[str] = mapped_column(String(32), index=True)
    user_id: Mapped[str] = mapped_column(String(32), ForeignKey("users.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(255), default="")
    created: Mapped[Created]
    expires_at: Mapped[datetime]
    family_expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    revoked_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
