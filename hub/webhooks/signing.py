"""Signatures receivers check: ``X-Giftcard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The MAC covers ``f"{t}.{body}"`` with the subscription's secret as the key (its UTF-8 bytes),
so the timestamp cannot be changed without breaking the signature: a receiver that refuses
timestamps older than a few minutes refuses replays of a captured delivery, and dedupes the
rest by ``X-Giftcard-Event-Id`` (delivery is at least once). Every attempt is signed afresh.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SIGNATURE_HEADER = "X-Giftcard-Signature"
EVENT_ID_HEADER = "X-Giftcard-Event-Id"
EVENT_TYPE_HEADER = "X-Giftcard-Event-Type"
SCHEME = "v1"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # 256 bits, the size of the HMAC-SHA256 key it becomes
TOLERANCE_S = 300  # what we advise receivers: refuse signatures older (or newer) than 5 minutes


class SignatureInvalid(Exception):
    """A delivery whose signature a receiver must refuse; the message says why."""


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), b"%d.%s" % (timestamp, body), hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The header value for ``body`` sent at ``timestamp`` (unix seconds)."""
    return f"t={timestamp},{SCHEME}={mac(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, *, now_s: float, tolerance_s: float = TOLERANCE_S) -> int:
    """What a receiver does: returns the signed timestamp, or raises ``SignatureInvalid``.

    Several ``v1=`` entries are accepted (one of them must match), so a sender could sign with
    an old and a new secret while a receiver rotates.
    """
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
