"""The VTEX shapes on the wire: one msgspec Struct per request, decoded once at the edge.

Names are camelCase on the wire (``rename="camel"``); unknown fields are accepted
and ignored, as VTEX callers send more than the specs list. Amounts decode to
exact ``Decimal``; the ledger refuses anything the currency cannot represent.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from ledger.domain.errors import InvalidRequest

JSON_DEPTH_MAX = 32


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
    value = decoder.decode(body)
    check_storable(value)
    return value


def check_storable(value: Any, depth: int = 0) -> None:
    """What PostgreSQL would refuse later is refused here, as a 400 naming it: documents nested
    deeper than we keep, and the NUL character, which no text or jsonb column can hold."""
    if depth > JSON_DEPTH_MAX:
        raise InvalidRequest(f"JSON nested deeper than {JSON_DEPTH_MAX} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidRequest("text must not contain the NUL character (\\u0000)")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_storable(key, depth + 1)
            check_storable(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_storable(item, depth + 1)
    elif isinstance(value, msgspec.Struct):
        for field in value.__struct_fields__:
            check_storable(getattr(value, field), depth + 1)


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
