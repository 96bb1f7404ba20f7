"""Redemption codes and tokens: generated, hashed, masked, checked. Pure functions, no I/O.

A code is what a shopper types at checkout, so it is money in text form: it is
shown once, at creation, and from then on only its keyed hash and last four
characters are kept. A card's token is a keyed HMAC of its id: every read of the
card shows it in full (it unlocks nothing without the API keys), and since it is
derived rather than stored, every card has one, however old.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from ledger.domain import errors

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
# 32 letters (160 bits of the HMAC): as long as the token in VTEX's examples.
TOKEN_CHARS = 32
TOKEN_KEY_PURPOSE = b"redemption-tokens"
_TO_CODE_ALPHABET = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", CODE_ALPHABET.encode())
# A code as it was shown (``HAWN-TAHN-2BT0-QKSM``): what checkout sends on every Debit, already normal.
_NORMAL_CODE = re.compile(r"[0-9A-Z]{4}(?:-[0-9A-Z]{4}){3}")  # CODE_GROUPS of CODE_GROUP_CHARS


def new_redemption_code() -> str:
    # The alphabet has exactly 2**5 letters, so every 5 bits of one 80-bit draw pick a letter
    # uniformly: the same code space as sixteen secrets.choice calls, at a sixth of the cost
    # (bulk issuance draws hundreds of thousands).
    bits = secrets.randbits(CODE_ENTROPY_BITS)
    chars = [CODE_ALPHABET[(bits >> (CODE_BITS_PER_CHAR * i)) & CODE_CHAR_MASK] for i in range(CODE_CHARS)]
    groups = ("".join(chars[i : i + CODE_GROUP_CHARS]) for i in range(0, len(chars), CODE_GROUP_CHARS))
    return "-".join(groups)


def normalize_code(code: str) -> str:
    """What a shopper types may differ in case, spacing and dashes; the hash must not.

    Codes were always hashed in their dashed form, so a code typed without its dashes gets them
    back rather than every stored hash changing.
    """
    if _NORMAL_CODE.fullmatch(code):
        return code  # one match instead of a split, a join and four slices: 1.3 µs of every Debit
    compact = "".join(code.split()).upper()
    bare = compact.replace("-", "")
    if len(bare) != CODE_CHARS:
        return compact
    return "-".join(bare[i : i + CODE_GROUP_CHARS] for i in range(0, CODE_CHARS, CODE_GROUP_CHARS))


def hash_code(code: str, key: bytes) -> bytes:
    return hmac.digest(key, normalize_code(code).encode(), "sha256")


def mask_code(last_chars: str, length: int = CODE_GROUPS * CODE_GROUP_CHARS + CODE_GROUPS - 1) -> str:
    """``***************WXYZ``: the form every response after creation shows."""
    return "*" * (length - len(last_chars)) + last_chars


def visible_tail(code: str) -> str:
    return normalize_code(code)[-MASK_VISIBLE_CHARS:]


def token_key(code_key: bytes) -> bytes:
    """The tokens' own key, derived from the codes' key: a deployment has both without storing a new secret."""
    return hmac.new(code_key, TOKEN_KEY_PURPOSE, hashlib.sha256).digest()


def redemption_token(card_id: str, key: bytes) -> str:
    # 20 bytes are exactly 32 letters of base32, whose alphabet is then swapped for the codes' own
    # (no letter a shopper or a support agent can misread).
    digest = hmac.digest(key, card_id.encode(), "sha256")[: TOKEN_CHARS * CODE_BITS_PER_CHAR // 8]
    return base64.b32encode(digest).translate(_TO_CODE_ALPHABET).decode()


# ---- guards: a transaction that names a code or token must name this card's ----------------


def check_redemption_code(given: str | None, code_hash: bytes | None, key: bytes) -> None:
    """An empty code names no card, so it passes: VTEX's callers may send only the token, or neither."""
    if not given or not given.strip():
        return
    if code_hash is None or not hmac.compare_digest(hash_code(given, key), code_hash):
        raise errors.RedemptionCodeMismatch("redemptionCode is not this gift card's redemption code")


def check_redemption_token(given: str | None, card_id: str, key: bytes) -> None:
    if not given or not given.strip():
        return
    # Compared as bytes: compare_digest refuses a str that is not ASCII, and a caller may send one.
    if not hmac.compare_digest("".join(given.split()).upper().encode(), redemption_token(card_id, key).encode()):
        raise errors.RedemptionTokenMismatch("redemptionToken is not this gift card's redemption token")
