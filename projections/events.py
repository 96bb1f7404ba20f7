"""The events the read models follow, decoded into the few fields they need.

Native card events are the GiftCard aggregate's (stored ``type`` is the event's stable name
or, in rows of earlier releases, a legacy topic: match on ``RecordedEvent.name``, and filter SQL on
``sql_types``; ``data`` is its JSON state, amounts already in minor units). Calls the hub forwards
to external providers are ``ProviderCallForwarded`` events (written by hub/providers/external.py)
whose ``value`` is a decimal string in major units of a currency the hub never learns.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from ledger.domain import topics
from ledger.domain.giftcard import CREDIT, DEBIT
from ledger.domain.money import AMOUNT_MINOR_MAX
from ledger.eventstore.store import RecordedEvent

ISSUED = topics.ISSUED
CREDITED = topics.CREDITED
DEBITED = topics.DEBITED
SETTLED = topics.SETTLED
CANCELLED = topics.CANCELLED
# An expired hold voided by the ledger: the same fields as a cancellation that only releases.
VOIDED = topics.VOIDED
FORWARDED = "ProviderCallForwarded"  # hub/providers/external.py FORWARDED; projections do not import the hub

OPERATION_OF = {CREDITED: CREDIT, DEBITED: DEBIT}


def sql_types(*names: str) -> str:
    """Every stored ``type`` of ``names`` as a list of SQL literals, for ``type in (...)`` in a query's text."""
    return ", ".join(f"'{t}'" for t in topics.stored_types(*names))


# Forwarded calls that moved money or made a card, when the provider answered "ok". A call that
# timed out or failed has an unknown or no effect at the provider, and is not counted.
FORWARDED_CREATE_CARD = "CreateGiftCard"
FORWARDED_CREATE_TRANSACTION = "CreateGiftCardTransaction"
FORWARDED_SETTLE = "CreateGiftCardTransactionSettlement"
FORWARDED_CANCEL = "CreateGiftCardTransactionCancellation"
FORWARDED_OK = "ok"

# External amounts are kept in units of 10^-4, the finest exponent ISO 4217 uses (CLF, UYW),
# since their currency is unknown; larger than this is refused like the ledger refuses it.
UNKNOWN_CURRENCY_EXPONENT = 4
UNKNOWN_CURRENCY_AMOUNT_MAX = AMOUNT_MINOR_MAX * 10**2


class Issued(msgspec.Struct):
    currency: str
    relation_name: str
    emission_date: str
    expiring_date: str
    issued_at: str


class TransactionCreated(msgspec.Struct):
    """Credited or Debited."""

    transaction_id: str
    value: int
    date: str
    request_id: str
    description: str = ""
    order_info: dict[str, Any] | None = None

    @property
    def order_id(self) -> str | None:
        order_id = (self.order_info or {}).get("orderId")
        return None if order_id is None else str(order_id)


class Settled(msgspec.Struct):
    transaction_id: str
    oid: str
    value: int
    date: str
    request_id: str


class Cancelled(msgspec.Struct):
    transaction_id: str
    oid: str
    value: int
    released: int
    refunded: int
    date: str
    request_id: str


class Forwarded(msgspec.Struct, rename="camel"):
    operation: str
    provider_id: str
    outcome: str
    card_id: str | None = None
    transaction_id: str | None = None
    value: str | None = None
    request_id: str | None = None
    transaction_operation: str | None = None  # Credit or Debit; absent from events recorded before it was


_decoders: dict[type, msgspec.json.Decoder] = {}


def decode(event: RecordedEvent, shape: type[Any]) -> Any:
    if event.state is not None:  # the store decoded it already, reading it: converting that is 5 times cheaper
        return msgspec.convert(event.state, shape)
    decoder = _decoders.get(shape)
    if decoder is None:
        decoder = _decoders[shape] = msgspec.json.Decoder(shape)
    return decoder.decode(event.data)


def instant(value: str) -> datetime:
    """A date written by the ledger's clock (ISO 8601 with offset)."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def forwarded_money(call: Forwarded) -> bool:
    """A forwarded call the provider accepted and that moved money or issued a card."""
    return call.outcome == FORWARDED_OK and call.operation in (
        FORWARDED_CREATE_CARD,
        FORWARDED_CREATE_TRANSACTION,
        FORWARDED_SETTLE,
        FORWARDED_CANCEL,
    )


def forwarded_amount(value: str | None) -> int | None:
    """A forwarded decimal string as an exact count of 10^-4 units; None when it is not one."""
    if value is None:
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:
        return None
    if not amount.is_finite() or not 0 < amount <= UNKNOWN_CURRENCY_AMOUNT_MAX:
        return None
    scaled = amount.scaleb(UNKNOWN_CURRENCY_EXPONENT)
    if scaled != scaled.to_integral_value() or scaled > UNKNOWN_CURRENCY_AMOUNT_MAX:
        return None
    return int(scaled)
