"""What a subscriber receives: each ledger event as a public JSON document.

::

    {"id": 42, "type": "card.debited", "occurredAt": "2026-01-15T12:00:00.000Z",
     "recordedAt": "2026-01-15T12:00:00.013Z", "cardId": "674df61f-...", "version": 3,
     "data": {"transactionId": "c42a...", "value": 30.50, "currency": "USD", ...}}

``id`` is the event's global position (receivers dedupe by it), ``version`` its place in
the card's (or provider's) own stream, so a receiver can also check it got every event of a
card in order. Card events are mapped generically: ``GiftCard.<Name>`` becomes
``card.<name>`` with its fields in camelCase and its amounts (``value``, ``released``,
``refunded``, ...) as exact decimals in major units of ``currency``. So an event type the
ledger learns later (``Voided`` was one) is delivered without a change here. Provider registry
changes are ``provider.changed`` (``change``: ``registered`` or ``removed``), never with the
provider's credentials. Other events (calls forwarded to external providers) are not delivered.
"""

from __future__ import annotations

import functools
from decimal import Decimal
from typing import Any

import msgspec

from hub.wire import encode, format_datetime
from ledger.application.providers import REGISTERED, REMOVED
from ledger.domain import topics
from ledger.domain.money import to_major
from ledger.eventstore.store import RecordedEvent
from ledger.postgres.personal_data import without_personal

ISSUED = topics.ISSUED
PROVIDER_CHANGES = {REGISTERED: "registered", REMOVED: "removed"}

CARD_PREFIX = "card."
PROVIDER_CHANGED = "provider.changed"
# What a subscription may ask for by name. A subscription without a filter gets every type,
# including card types added later.
EVENT_TYPES = (
    "card.issued",
    "card.credited",
    "card.debited",
    "card.settled",
    "card.cancelled",
    "card.voided",
    PROVIDER_CHANGED,
)

MONEY_FIELDS = frozenset({"value", "released", "refunded", "amount", "balance"})  # minor units in events
# Bookkeeping of the eventsourcing library, a hint of the redemption code, sealed credentials:
# nothing a subscriber needs, and the last two are nobody's business outside the ledger.
PRIVATE_FIELDS = frozenset({"originator_topic", "timestamp", "code_tail", "credentials"})
OCCURRED_FIELDS = ("date", "issued_at")  # the ledger's clock, covered by the hash chain

_data_decoder = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal)  # orderInfo numbers stay exact


class Unrenderable(Exception):
    """An event that cannot become a payload (a card event whose card has no currency)."""


def public_type(stored_type: str) -> str | None:
    """The type subscribers see; None for events that are not delivered."""
    name = topics.event_name(stored_type)
    if name.startswith(topics.CARD_PREFIX):
        return CARD_PREFIX + name.removeprefix(topics.CARD_PREFIX).lower()
    if stored_type in PROVIDER_CHANGES:
        return PROVIDER_CHANGED
    return None


def is_card_event(event: RecordedEvent) -> bool:
    return event.name.startswith(topics.CARD_PREFIX)


def needs_card_currency(event: RecordedEvent) -> bool:
    """Card events other than the issue carry amounts without their currency (the issue has it)."""
    return is_card_event(event) and event.name != ISSUED


def currency_of_issue(event: RecordedEvent) -> str | None:
    return _data_decoder.decode(event.data).get("currency") if event.name == ISSUED else None


def render(event: RecordedEvent, currency: str | None) -> bytes:
    """The JSON body for a delivered event (``public_type`` is not None); ``currency`` is its card's."""
    data = _data_decoder.decode(event.data)
    payload: dict[str, Any] = {
        "id": event.position,
        "type": public_type(event.type),
        "occurredAt": _occurred_at(event, data),
        "recordedAt": format_datetime(event.recorded_at),
    }
    if is_card_event(event):
        payload["cardId"] = event.stream_id
        payload["version"] = event.version
        payload["data"] = _card_data(event, data, currency)
    else:
        payload["providerId"] = data.get("providerId")
        payload["version"] = event.version
        payload["data"] = {"change": PROVIDER_CHANGES[event.type], **_public_fields(data)}
    return encode(payload)


def _card_data(event: RecordedEvent, data: dict[str, Any], currency: str | None) -> dict[str, Any]:
    currency = data.get("currency", currency)
    money = [key for key, value in data.items() if key in MONEY_FIELDS and isinstance(value, int)]
    if money and currency is None:
        raise Unrenderable(f"event {event.position} ({event.type}) has amounts but its card has no known currency")
    # Personal data (ledger.postgres.personal_data) is never delivered, sealed or not: a subscriber's copy,
    # or a dead letter's, could not be erased with its person.
    public = _public_fields(
        {key: to_major(value, currency) if key in money else value for key, value in without_personal(data).items()}
    )
    public["currency"] = currency
    return public


def _public_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {_camel(key): value for key, value in data.items() if key not in PRIVATE_FIELDS}


@functools.cache  # the events' field names: a few dozen, each converted once per process
def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _occurred_at(event: RecordedEvent, data: dict[str, Any]) -> str:
    for field in OCCURRED_FIELDS:
        if isinstance(data.get(field), str):
            return format_datetime(data[field])
    return format_datetime(event.recorded_at)
