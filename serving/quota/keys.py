"""API keys: issued once in plaintext, stored only as a SHA-256 digest.

A key looks like ``sb_<key_id>_<secret>``. The ``key_id`` is public (it names the
key in listings, usage records and logs); the secret is 32 random bytes. Keys
are high-entropy random strings, so a fast hash is the right tool here (a slow
password hash would only cost every request time, not an attacker), and the
digest comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from serving.quota.model import ApiKey

PREFIX = "sb"
_KEY_ID_BYTES = 6  # 12 hex chars
_SECRET_BYTES = 32


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_key(tenant: str, label: str = "", now: float | None = None) -> tuple[str, ApiKey]:
    """A fresh key: the plaintext (show it once) and the record to store."""
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    plaintext = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    record = ApiKey(
        key_id=key_id,
        tenant=tenant,
        secret_hash=hash_key(plaintext),
        label=label,
        created_at=time.time() if now is None else now,
    )
    return plaintext, record


def key_id_of(plaintext: str) -> str | None:
    """The public id inside a presented key, or None if it is not shaped like one of ours."""
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or len(parts[1]) != 2 * _KEY_ID_BYTES or not parts[2]:
        return None
    return parts[1]


def matches(plaintext: str, record: ApiKey) -> bool:
    """Timing-safe check of a presented key against a stored digest."""
    return hmac.compare_digest(hash_key(plaintext), record.secret_hash)


def authorization(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | bytes | None:
    """The raw value of the first ``authorization`` entry, or None."""
    for name, value in metadata or ():
        if name == "authorization":
            return value
    return None


def token_of(header: str | bytes | None) -> str | None:
    """The key in an ``authorization`` value (``Bearer <key>``), or None."""
    if header is None:
        return None
    if isinstance(header, bytes):
        header = header.decode(errors="replace")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
