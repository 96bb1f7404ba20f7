"""Signatures receivers check: Standard Webhooks, and the hub's own older header for one release.

Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id`` is the event's id (the key
receivers dedupe on, the same on every retry), ``webhook-timestamp`` this attempt's unix seconds,
and ``webhook-signature`` is ``v1,<base64 HMAC-SHA256>`` of ``f"{id}.{timestamp}.{body}"``, keyed
with the bytes the secret's base64 (after ``whsec_``) encodes. Signing the id and the timestamp
means neither can be changed: a receiver that refuses old timestamps refuses replays of a captured
delivery, and dedupes the rest by an id it can trust. Any Standard Webhooks library verifies them.

Deprecated, sent alongside until the next release: ``X-Giftcard-Signature: t=<unix seconds>,v1=<hex>``,
HMAC-SHA256 of ``f"{t}.{body}"`` keyed with the secret string's UTF-8 bytes, and the unsigned
``X-Giftcard-Event-Id``.

A subscription signs with one secret, or with two while it rotates (the new one first): each
header then carries a signature per secret, and a receiver holding either accepts the delivery.
Every attempt is signed afresh.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Sequence

WEBHOOK_ID_HEADER = "webhook-id"
WEBHOOK_TIMESTAMP_HEADER = "webhook-timestamp"
WEBHOOK_SIGNATURE_HEADER = "webhook-signature"
SIGNATURE_HEADER = "X-Giftcard-Signature"  # deprecated
EVENT_ID_HEADER = "X-Giftcard-Event-Id"  # deprecated: not signed; webhook-id is
EVENT_TYPE_HEADER = "X-Giftcard-Event-Type"
SCHEME = "v1"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # 256 bits, the size of an HMAC-SHA256 key
KEY_BYTES_MIN, KEY_BYTES_MAX = 24, 64  # what the Standard Webhooks spec allows a secret to encode
TOLERANCE_S = 300  # what we advise receivers (and Standard Webhooks libraries do): 5 minutes either way


class SignatureInvalid(Exception):
    """A delivery whose signature a receiver must refuse; the message says why."""


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and the standard base64 of random key bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def standard_key(secret: str) -> bytes | None:
    """The HMAC key a Standard Webhooks library takes from ``secret``; None when it holds none.

    Secrets made before the hub spoke Standard Webhooks are URL-safe base64: the quarter of them
    without ``-`` or ``_`` are standard base64 too (missing only their padding) and sign as they
    are; the others are not base64 at all (libraries refuse them, or silently drop those characters
    and derive another key), so they sign the deprecated header only until rotated.
    """
    if not secret.startswith(SECRET_PREFIX):
        return None
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        return None
    return key if KEY_BYTES_MIN <= len(key) <= KEY_BYTES_MAX else None


def is_standard(secret: str) -> bool:
    return standard_key(secret) is not None


def signed_headers(signing_secrets: Sequence[str], event_id: int, timestamp: int, body: bytes) -> dict[str, str]:
    """Every signing header of one attempt at delivering ``body`` at ``timestamp`` (unix seconds)."""
    return Signer(signing_secrets).headers(event_id, timestamp, body)


class Signer:
    """Signs a subscription's deliveries with its secrets, their keys decoded once (not per event).

    The Standard Webhooks headers are left out when no secret holds a key: a receiver's library
    then says they are missing rather than that every signature is wrong.
    """

    def __init__(self, signing_secrets: Sequence[str]) -> None:
        self.secrets = tuple(signing_secrets)
        self.keys = [key for key in map(standard_key, self.secrets) if key is not None]
        self._secret_bytes = [secret.encode() for secret in self.secrets]

    def headers(self, event_id: int, timestamp: int, body: bytes) -> dict[str, str]:
        message_id = str(event_id)
        # What the deprecated header signs, "{timestamp}.{body}", is the end of what Standard Webhooks
        # signs, "{id}.{timestamp}.{body}": the body is copied into a message once for each.
        signed = b"%d.%s" % (timestamp, body)
        headers = {
            SIGNATURE_HEADER: _deprecated_header(self._secret_bytes, timestamp, signed),
            EVENT_ID_HEADER: message_id,
        }
        if self.keys:
            standard = b"%d.%s" % (event_id, signed)
            headers[WEBHOOK_ID_HEADER] = message_id
            headers[WEBHOOK_TIMESTAMP_HEADER] = str(timestamp)
            headers[WEBHOOK_SIGNATURE_HEADER] = " ".join(
                f"{SCHEME},{base64.b64encode(_hmac(key, standard)).decode()}" for key in self.keys
            )
        return headers


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")  # OpenSSL's one-shot HMAC: no HMAC object built in Python


# ---- the deprecated header ---------------------------------------------------------------------


def mac(secret: str, timestamp: int, body: bytes) -> str:
    return _hmac(secret.encode(), b"%d.%s" % (timestamp, body)).hex()


def sign(signing_secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """The ``X-Giftcard-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    return _deprecated_header([secret.encode() for secret in signing_secrets], timestamp, b"%d.%s" % (timestamp, body))


def _deprecated_header(secrets_bytes: Sequence[bytes], timestamp: int, signed: bytes) -> str:
    """``signed`` is ``f"{timestamp}.{body}"``."""
    macs = ",".join(f"{SCHEME}={_hmac(secret, signed).hex()}" for secret in secrets_bytes)
    return f"t={timestamp},{macs}"


def verify(secret: str, header: str, body: bytes, *, now_s: float, tolerance_s: float = TOLERANCE_S) -> int:
    """What a receiver of ``X-Giftcard-Signature`` does: returns the signed timestamp, or raises
    ``SignatureInvalid``. One of the ``v1=`` entries must match (two while the sender rotates)."""
    timestamp, candidates = _parse(header)
    expected = mac(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise SignatureInvalid("signature does not match the body")
    if abs(now_s - timestamp) > tolerance_s:
        raise SignatureInvalid(f"signature timestamp {timestamp} is more than {tolerance_s:g} s from now")
    return timestamp


def _parse(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == SCHEME and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureInvalid(f"{SIGNATURE_HEADER} must look like 't=<unix seconds>,{SCHEME}=<hex>'")
    return timestamp, candidates
