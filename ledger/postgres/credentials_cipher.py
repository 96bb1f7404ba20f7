"""Encryption at rest for external providers' credentials (AES-256-GCM).

The key is derived from ``GIFTCARD_SECRET_KEY``; without one, credentials are
refused rather than stored in a form anyone with the database could read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.domain.errors import InvalidRequest

NONCE_BYTES = 12
PURPOSE = b"provider-credentials"


class SecretKeyMissing(InvalidRequest):
    code = "secret_key_not_configured"


class CredentialsCipher:
    def __init__(self, root_secret: str | None) -> None:
        self._aead = (
            None if not root_secret else AESGCM(hmac.new(root_secret.encode(), PURPOSE, hashlib.sha256).digest())
        )

    @property
    def available(self) -> bool:
        return self._aead is not None

    def encrypt(self, plaintext: bytes, context: str) -> str:
        if self._aead is None:
            raise SecretKeyMissing(
                "provider credentials cannot be stored: set GIFTCARD_SECRET_KEY so they are encrypted at rest"
            )
        nonce = secrets.token_bytes(NONCE_BYTES)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext, context.encode())).decode()

    def decrypt(self, token: str, context: str) -> bytes:
        if self._aead is None:
            raise SecretKeyMissing("provider credentials cannot be read: GIFTCARD_SECRET_KEY is not set")
        raw = base64.b64decode(token)
        return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
