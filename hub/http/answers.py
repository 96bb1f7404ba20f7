"""What each route answers, as msgspec Structs: the response schemas of ``/openapi.json``.

Requests are decoded by Structs (``hub.wire``); answers are rendered as dicts by the handlers,
so these Structs are their declared shapes. tests/test_openapi.py checks real answers against
them, so a renderer that drifts from its declaration fails there.

A field with no default is always present; ``UNSET`` marks one that is present only sometimes
(never ``null``); ``X | None`` one that is present and may be ``null``. Amounts are ``Decimal``,
written as JSON numbers in major units of the currency.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

Instant = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
Day = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date"})]


def wire_name(field: str) -> str:
    """camelCase, as everything on the wire; ``self_`` is VTEX's ``_self`` link."""
    if field == "self_":
        return "_self"
    head, *rest = field.split("_")
    return head + "".join(part.title() for part in rest)


class Link(msgspec.Struct, rename=wire_name):
    """A path on this service, as VTEX's relative hrefs: ``/native/giftcards/{id}`` for the default
    tenant, ``/{account}/native/giftcards/{id}`` for another (``hub.http.accounts``)."""

    href: str


# ---- gift cards: the Provider Protocol, the native Gift Card API and the hub -----------------


class Card(msgspec.Struct, rename=wire_name):
    """A card as GET answers it: the redemption code masked except in the answer that created it."""

    id: str
    redemption_token: str
    redemption_code: str
    balance: Decimal
    relation_name: str
    caption: str
    emission_date: Instant
    expiring_date: Instant
    currency_code: str
    discount: bool
    transaction: Link
    transactions: Link


class CreatedCard(Card, rename=wire_name):
    """The Provider Protocol's create: the card, and the request's echo."""

    restricted_to_owner: bool
    multiple_redemptions: bool
    multiple_credits: bool
    profile_id: str


class HubCard(Card, rename=wire_name):
    """A card through the hub: an external provider's fields as it answers them, with the hub's links."""

    provider: str
    self_: Link


class HubCreatedCard(HubCard, rename=wire_name):
    """The native provider echoes the request; an external provider's answer is completed from its card."""

    restricted_to_owner: bool | UnsetType = UNSET
    multiple_redemptions: bool | UnsetType = UNSET
    multiple_credits: bool | UnsetType = UNSET
    profile_id: str | UnsetType = UNSET


class SearchItem(msgspec.Struct, rename=wire_name):
    """A usable card (never one with no money or outside its validity)."""

    id: str
    provider: str
    self_: Link
    balance: Decimal | UnsetType = UNSET
    caption: str | UnsetType = UNSET
    relation_name: str | UnsetType = UNSET
    currency_code: str | UnsetType = UNSET


class CardRef(msgspec.Struct, rename=wire_name):
    id: str
    self_: Link


class Paging(msgspec.Struct, rename=wire_name):
    page: int
    per_page: int
    total: int
    pages: int


class SearchPage(msgspec.Struct, rename=wire_name):
    """The native Gift Card API's ``_search``: VTEX's ``{items, paging}``."""

    items: list[CardRef]
    paging: Paging


class TransactionRef(msgspec.Struct, rename=wire_name):
    card_id: str
    id: str
    self_: Link


class HubTransactionRef(TransactionRef, rename=wire_name):
    provider: str


class Transaction(msgspec.Struct, rename=wire_name):
    card_id: str
    id: str
    operation: str
    value: Decimal
    description: str
    date: Instant
    request_id: str
    settlement: Link
    cancellation: Link
    authorization: Link
    order_info: dict[str, Any] | UnsetType = UNSET  # as it was sent with the transaction, when one was


class OperationRecord(msgspec.Struct, rename=wire_name):
    """An authorization, a settlement or a cancellation."""

    oid: str
    value: Decimal
    date: Instant


class BatchCard(msgspec.Struct, rename=wire_name):
    n: int
    id: str
    relation_name: str
    redemption_code: str
    self_: Link


class Batch(msgspec.Struct, rename=wire_name):
    """Only the cards issued by this request are listed: codes are shown once."""

    batch_id: str
    count: int
    issued_now: int
    already_issued: int
    value: Decimal
    currency_code: str
    expiring_date: Instant
    caption: str | None
    profile_id: str | None
    cards: list[BatchCard]
    note: str | UnsetType = UNSET


# ---- the hub's provider registry ----------------------------------------------------------


class Provider(msgspec.Struct, rename=wire_name):
    id: str
    service_url: str
    oauth_provider: str
    caption: str | None
    pre_auth_enabled: bool
    cancel_enabled: bool
    self_: Link


class ErrorDetail(msgspec.Struct, rename=wire_name):
    code: str
    message: str
    detail: Any = UNSET


class Error(msgspec.Struct, rename=wire_name):
    """Every refusal but the Provider Protocol's 401/403 (empty bodies, as VTEX's hub expects)."""

    error: ErrorDetail


class ProviderOutcome(msgspec.Struct, rename=wire_name):
    id: str
    status: Literal["ok", "timeout", "unavailable", "failed"]
    count: int
    latency_ms: float
    error: ErrorDetail | UnsetType = UNSET


class SearchEverywhere(msgspec.Struct, rename=wire_name):
    items: list[SearchItem]
    providers: list[ProviderOutcome]


# ---- read models -----------------------------------------------------------------------------


class ReplicaLag(msgspec.Struct, rename=wire_name):
    lag_seconds: float | None
    lag_bytes: int | None
    in_recovery: bool


class Freshness(msgspec.Struct, rename=wire_name):
    """How far the projection read is behind the events; ``replica`` when a replica was read."""

    projection: str
    checkpoint: dict[str, int]  # the last event applied, per source
    last_event_at: Instant | None
    updated_at: Instant
    lag_events: int
    lag_events_by_source: dict[str, int]
    lag_seconds: float
    rebuilding: bool
    replica: ReplicaLag | UnsetType = UNSET


class Balance(msgspec.Struct, rename=wire_name):
    card_id: str
    provider: str
    currency: str
    balance: Decimal
    authorized: Decimal
    settled: Decimal
    credited: Decimal
    debited: Decimal
    status: str
    relation_name: str
    emission_date: Instant
    expiring_date: Instant
    issued_at: Instant
    last_activity_at: Instant


class OneBalance(Balance, rename=wire_name):
    freshness: Freshness


class BalancePage(msgspec.Struct, rename=wire_name):
    items: list[Balance]
    freshness: Freshness


class LedgerOperation(msgspec.Struct, rename=wire_name):
    oid: str
    value: Decimal | None
    date: Instant
    request_id: str | None
    released: Decimal | None | UnsetType = UNSET  # cancellations: what was held, then what was refunded
    refunded: Decimal | None | UnsetType = UNSET


class LedgerTransaction(msgspec.Struct, rename=wire_name):
    """``currency`` null: an external provider's amount, whose currency the hub does not record."""

    provider: str
    card_id: str
    id: str
    source: str
    operation: str
    currency: str | None
    value: Decimal | None
    settled: Decimal | None
    cancelled: Decimal | None
    description: str | None
    request_id: str | None
    order_id: str | None
    date: Instant
    settlements: list[LedgerOperation]
    cancellations: list[LedgerOperation]


class TransactionPage(msgspec.Struct, rename=wire_name):
    items: list[LedgerTransaction]
    freshness: Freshness


class DailyTotal(msgspec.Struct, rename=wire_name):
    """``balanceChange`` and ``liability`` only for the native provider (an external one keeps its own)."""

    day: Day
    currency: str | None
    provider: str
    cards_issued: int
    transactions: int
    loaded: Decimal | None
    redeemed: Decimal | None
    unclassified: Decimal | None
    settled: Decimal | None
    cancelled: Decimal | None
    balance_change: Decimal | None
    liability: Decimal | None


class DailyTotalsPage(msgspec.Struct, rename=wire_name):
    items: list[DailyTotal]
    freshness: Freshness


class ProjectionState(Freshness, rename=wire_name, kw_only=True):
    name: str
    events_applied: int
    rebuilt_at: Instant | None


class Projections(msgspec.Struct, rename=wire_name):
    items: list[ProjectionState]
    replica: ReplicaLag | UnsetType = UNSET


class CardAudit(msgspec.Struct, rename=wire_name):
    """``giftcard audit card --json``: each event replayed, the state as of ``asOf``, every failure."""

    card_id: str
    provider: str
    currency: str | None
    as_of: Instant | None
    valid: bool
    failures: list[dict[str, Any]]
    state: dict[str, Any] | None
    events: list[dict[str, Any]]


# ---- webhooks --------------------------------------------------------------------------------


class Subscription(msgspec.Struct, rename=wire_name):
    """``attempts``: failures of the event delivery is blocked on (0: not blocked)."""

    id: str
    url: str
    events: list[str] | None  # null: every event type, including ones added later
    description: str | None
    created_at: Instant
    checkpoint: dict[str, int]
    lag_events: int
    delivered: int
    last_delivered_at: Instant | None
    attempts: int
    next_attempt_at: Instant | None
    last_error: str | None
    dead_letters: int


class CreatedSubscription(Subscription, rename=wire_name):
    secret: str  # shown in this answer only


class Subscriptions(msgspec.Struct, rename=wire_name):
    items: list[Subscription]


class RemovedSubscription(msgspec.Struct, rename=wire_name):
    id: str
    removed: bool


class DeadLetter(msgspec.Struct, rename=wire_name):
    subscription_id: str
    event_id: int
    type: str
    subject_id: str
    attempts: int
    last_error: str | None
    dead_at: Instant
    retry_requested: bool
    payload: dict[str, Any]  # exactly what was sent


class DeadLetters(msgspec.Struct, rename=wire_name):
    items: list[DeadLetter]


class RetryRequested(msgspec.Struct, rename=wire_name):
    id: str
    retry_requested: int  # how many dead letters get one more attempt


# ---- operations ----------------------------------------------------------------------------


class Alive(msgspec.Struct, rename=wire_name):
    status: Literal["alive"]


class Ready(msgspec.Struct, rename=wire_name):
    status: Literal["ready"]
    replication: dict[str, Any]  # whether commits are synchronously replicated, and to which standbys
