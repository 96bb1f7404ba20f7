"""Keys the ledger needs that must be the same in every process of one deployment.

``root_secret`` (``GIFTCARD_SECRET_KEY``) is the root secret when configured: each key is derived
from it with HMAC, so the database never holds it. Without one, a random key is
generated on first start and kept in ``instance_secrets``, which still makes
redemption-code hashes useless to anyone who has only a dump of the event table.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import asyncpg

KEY_BYTES = 32


async def instance_key(pool: asyncpg.Pool, purpose: str, root_secret: str | None) -> bytes:
    if root_secret:
        return hmac.new(root_secret.encode(), purpose.encode(), hashlib.sha256).digest()
    await pool.execute(
        "insert into instance_secrets (name, value) values ($1, $2) on conflict (name) do nothing",
        purpose,
        secrets.token_bytes(KEY_BYTES),
    )
    return await pool.fetchval("select value from instance_secrets where name = $1", purpose)
