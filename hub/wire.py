"""The VTEX shapes on the wire: one msgspec Struct per request, decoded once at the edge.

Names are camelCase on the wire (``rename="camel"``); unknown fields are accepted
and ignored, as VTEX callers send more than the specs list. Amounts decode to
exact ``Decimal``; the ledger refuses anything the currency cannot represent.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from itertools import accumulate
from typing import Any

import msgspec

from ledger.domain.errors import InvalidRequest

JSON_DEPTH_MAX = 32  # levels of objects and arrays in a request body, the body itself counted


class SearchClient(msgspec.Struct, rename="camel"):
    id: str | None = None
    email: str | None = None
    document: str | None = None
    corporate_document: str | None = None


class SearchCart(msgspec.Struct, rename="camel"):
    redemption_code: str | None = None
    relation_name: str | None = None


class SearchRequest(msgspec.Struct, rename="camel"):
    client: SearchClient | None = None
    cart: SearchCart | None = None


class CreateCardRequest(msgspec.Struct, rename="camel"):
    relation_name: str
    caption: str
    profile_id: str
    emission_date: str | None = None
    expiring_date: str | None = None
    currency_code: str | None = None
    restricted_to_owner: bool = False
    multiple_credits: bool = True
    multiple_redemptions: bool = True


class ClientProfile(msgspec.Struct, rename="camel"):
    email: str | None = None
    document: str | None = None


class OrderInfo(msgspec.Struct, rename="camel"):
    client_profile: ClientProfile | None = None


class CreateTransactionRequest(msgspec.Struct, rename="camel"):
    operation: str
    value: Decimal
    request_id: str
    description: str = ""
    redemption_token: str | None = None
    redemption_code: str | None = None
    order_info: dict[str, Any] | None = None


class OperationRequest(msgspec.Struct, rename="camel"):
    """A settlement or cancellation: ``{value, requestId}``."""

    value: Decimal
    request_id: str


class CreateBatchRequest(msgspec.Struct, rename="camel"):
    """Bulk issuance (``POST /api/giftcards/_batches``): ``count`` cards loaded with ``value`` each.
    Terms left out come from the batch's existing cards when resumed, else the defaults."""

    count: int
    value: Decimal
    batch_id: str | None = None
    currency_code: str | None = None
    expiring_date: str | None = None
    caption: str | None = None
    profile_id: str | None = None


_decoders: dict[type, msgspec.json.Decoder] = {}
# Untyped parts (orderInfo) keep their numbers exact, so no float ever reaches an event.
_order_info_decoder = msgspec.json.Decoder(OrderInfo)
# JSON has one way to write U+0000 in a string: this escape (msgspec refuses a raw NUL byte), so a
# body without it decodes to no NUL, and one with it (even as an escaped backslash's "\\u0000") is walked.
_NUL_ESCAPE = b"\\u0000"


def decode(body: bytes, type_: type[Any]) -> Any:
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_, float_hook=Decimal)
    if not body.strip():
        raise InvalidRequest("request body must be a JSON object")
    try:
        body.decode("utf-8")  # strict: msgspec lets encoded surrogates through, PostgreSQL would not
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not valid UTF-8") from None
    check_depth(body)
    value = decoder.decode(body)
    if _NUL_ESCAPE in body:  # the walk costs a checkout's Debit 8 µs; without this escape it finds nothing
        check_storable(value)
    return value


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes and all
_DEPTH_STEP = [1 if byte in b"[{" else -1 for byte in range(256)]  # indexed by a bracket's byte
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_NOT_QUOTES_OR_BRACKETS = bytes(byte for byte in range(256) if byte not in b'"[]{}')


def check_depth(body: bytes) -> None:
    """Refuses a body nested deeper than ``JSON_DEPTH_MAX`` before it is decoded: msgspec (and
    every walk over its result) recurses once per level, and past Python's recursion limit that
    is a RecursionError, not a clear 400. Malformed JSON (an unclosed string or bracket) is left
    to the decoder, unless its brackets alone already go too deep."""
    if body.count(b"[") + body.count(b"{") <= JSON_DEPTH_MAX:
        return  # no body nests deeper than it has brackets: a plain Debit stops here
    depths = accumulate(map(_DEPTH_STEP.__getitem__, _nesting_brackets(body)))
    if max(depths, default=0) > JSON_DEPTH_MAX:
        raise InvalidRequest(f"JSON nested deeper than {JSON_DEPTH_MAX} levels")


def _nesting_brackets(body: bytes) -> bytes:
    """The body's brackets outside its strings, in order.

    Kept to quotes and brackets, a string without brackets (nearly every one) is two adjacent
    quotes; when removing those pairs leaves no quote, every string was such a pair and what is
    left is the nesting, found in a few microseconds on a checkout's orderInfo. Otherwise (a
    bracket or an escaped quote in a string) the strings are cut out by a regular expression,
    about thirty times slower."""
    if b'\\"' not in body:
        brackets = body.translate(None, _NOT_QUOTES_OR_BRACKETS).replace(b'""', b"")
        if b'"' not in brackets:
            return brackets
    return _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)


def check_storable(value: Any) -> None:
    """What PostgreSQL would refuse later is refused here, as a 400 naming it: the NUL character,
    which no text or jsonb column can hold. (``check_depth`` has bounded the nesting.)"""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidRequest("text must not contain the NUL character (\\u0000)")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_storable(key)
            check_storable(item)
    elif isinstance(value, list):
        for item in value:
            check_storable(item)
    elif isinstance(value, msgspec.Struct):
        for field in value.__struct_fields__:
            check_storable(getattr(value, field))


def order_info_client(order_info: dict[str, Any] | None) -> ClientProfile | None:
    if not order_info:
        return None
    try:
        return msgspec.convert(order_info, OrderInfo).client_profile
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"orderInfo: {e}") from None


# The numbers of VTEX's orderInfo (cart totals, item values, prices, quantities, discounts, price
# tags, a seller's share). Non-integers are decoded as exact Decimals, which the event codec stores
# as strings ("14.990"); on the way out they are numbers again, written exactly as they came in.
ORDER_INFO_NUMBERS = frozenset(
    {"grandTotal", "discounts", "shipping", "taxes", "itemsTotal"}
    | {"value", "price", "quantity", "shippingDiscount", "discount"}
)
_DECIMAL_TEXT = re.compile(r"-?\d+(?:\.\d+)?(?:E[+-]?\d+)?")


def order_info_for_wire(value: Any, key: str | None = None) -> Any:
    """orderInfo as the caller sent it: what the ledger stored, with its decimals numbers again.

    Only a string under one of VTEX's number fields that reads as ``str(Decimal)`` is turned back;
    ``orderId``, ``sequence`` (some callers send it as text), names and addresses stay as they are.
    """
    if isinstance(value, dict):
        return {name: order_info_for_wire(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [order_info_for_wire(item, key) for item in value]
    if key in ORDER_INFO_NUMBERS and isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value):
        return Decimal(value)
    return value


YEAR_MIN = 1900  # VTEX's "never expires" is 9999-12-31; anything before 1900 is a typo


def parse_datetime(value: str, field: str) -> datetime:
    """ISO 8601 as VTEX writes it (``2016-01-01T00:00:00``, ``...Z``, 7-digit fractions); naive means UTC."""
    try:
        parsed = datetime.fromisoformat(value)
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        in_utc = parsed.astimezone(UTC)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{field} must be an ISO 8601 date-time, got {value!r}") from None
    if in_utc.year < YEAR_MIN:
        raise InvalidRequest(f"{field} must be after the year {YEAR_MIN}, got {value!r}")
    return in_utc


def format_datetime(value: datetime | str) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_encoder = msgspec.json.Encoder(decimal_format="number")


def encode(value: Any) -> bytes:
    return _encoder.encode(value)
