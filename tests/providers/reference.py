"""A reference EXTERNAL gift card provider: all 11 Gift Card Provider Protocol operations.

A small aiohttp application with its own in-memory store, served under a path prefix (a
``serviceUrl`` needs at least one path segment, NOTES 2.3). It is what a hub talks to in tests::

    from tests.providers.reference import start_reference_provider

    async with start_reference_provider() as provider:
        card = provider.state.issue_card(balance="100.00")
        hub_registers(provider.service_url, provider.app_key, provider.app_token)
        ...
        [forwarded] = provider.state.requests_for("GetGiftCardbyID")
        assert forwarded.headers["X-PROVIDER-API-AppKey"] == provider.app_key

or, as a fixture, ``from tests.providers.reference import reference_provider``.

Behaviour (NOTES 2-4, DESIGN "Card semantics"):

- Auth: ``X-PROVIDER-API-AppKey``/``AppToken`` missing or empty -> 401, wrong -> 403, empty bodies.
- Bodies: ``application/json`` or ``application/vnd.vtex.giftcards.v1+json`` (else 415); unknown
  fields and headers are ignored; amounts are JSON numbers in major units, never strings.
- A ``Credit`` adds to the balance and a ``Debit`` takes from it when the transaction is created.
  The transaction's value is then held: settlements capture from what is held; cancellations
  release what is still held, then refund what was captured. Cancelling a Debit credits the card
  back, cancelling a Credit debits it (never below zero).
- ``requestId`` is an idempotency key: per card for transactions, per transaction for settlements
  and for cancellations. The same key and payload replays the first answer; another payload is 409.
- ``_search`` never returns zero-balance or expired cards (it returns ``[]``, NOTES 4.1) and
  pages with ``REST-Range`` in both forms, ``resources=0-49`` and ``0-49``.
- Every request, refused or not, even outside the prefix, is recorded (method, path, headers, body).
"""

from __future__ import annotations

import hmac
import itertools
import json
import re
import secrets
import string
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from tests.providers.serving import serve

PREFIX = "/provider"
VND_JSON = "application/vnd.vtex.giftcards.v1+json"
ACCEPTED_CONTENT_TYPES = frozenset({"application/json", VND_JSON})
ACCEPTABLE_RESPONSE_TYPES = frozenset({"*/*", "application/*", "application/json", VND_JSON})
APP_KEY_HEADER = "X-PROVIDER-API-AppKey"
APP_TOKEN_HEADER = "X-PROVIDER-API-AppToken"
DEFAULT_APP_KEY = "reference-app-key"
DEFAULT_APP_TOKEN = "reference-app-token"
NO_CACHE = {"Cache-Control": "no-cache,no-store"}  # as the VTEX reference app does (NOTES 2.2)

DEFAULT_RANGE = (0, 49)  # REST-Range default, inclusive (NOTES 2.4)
DEFAULT_VALIDITY = timedelta(days=365)  # when a create request names no expiringDate
MAX_AMOUNT = Decimal("1000000000")  # major units; anything larger is a client error, not money
CURRENCY_EXPONENTS = {"BHD": 3, "CLP": 0, "JOD": 3, "JPY": 0, "KRW": 0, "KWD": 3, "OMR": 3, "TND": 3}
DEFAULT_EXPONENT = 2
MASK_VISIBLE_CHARS = 4  # redemption codes are shown as ***********ASDQ
CODE_ALPHABET = string.ascii_uppercase + string.digits
TOKEN_ALPHABET = string.ascii_letters + string.digits
TOKEN_LENGTH = 32

# Route names are the Provider Protocol operationIds, so tests and fault plans name routes as the spec does.
SEARCH = "ListAllGiftCards"
GET_CARD = "GetGiftCardbyID"
CREATE_CARD = "CreateGiftCard"
CREATE_TRANSACTION = "CreateGiftCardTransaction"
LIST_TRANSACTIONS = "ListAllGiftCardTransactions"
GET_TRANSACTION = "GetGiftCardTransactionbyID"
GET_AUTHORIZATION = "GetGiftCardTransactionAuthorization"
CANCEL = "CreateGiftCardTransactionCancellation"
LIST_CANCELLATIONS = "ListAllGiftCardTransactionsCancellations"
SETTLE = "CreateGiftCardTransactionSettlement"
LIST_SETTLEMENTS = "ListAllGiftCardTransactionsSettlements"
OPERATION_IDS = (
    SEARCH,
    GET_CARD,
    CREATE_CARD,
    CREATE_TRANSACTION,
    LIST_TRANSACTIONS,
    GET_TRANSACTION,
    GET_AUTHORIZATION,
    CANCEL,
    LIST_CANCELLATIONS,
    SETTLE,
    LIST_SETTLEMENTS,
)

_REST_RANGE = re.compile(r"^\s*(?:resources\s*=\s*)?(\d{1,9})\s*-\s*(\d{1,9})\s*$", re.IGNORECASE)


def parse_rest_range(value: str | None, default: tuple[int, int] = DEFAULT_RANGE) -> tuple[int, int]:
    """``resources=0-49`` or ``0-49`` (onready/vtex-node-sdk's form, NOTES 2.4) -> inclusive (0, 49)."""
    if value is None or not value.strip():
        return default
    match = _REST_RANGE.match(value)
    if not match:
        raise ValueError(f"REST-Range must look like 'resources=0-49' or '0-49', got {value!r}")
    start, end = int(match[1]), int(match[2])
    if end < start:
        raise ValueError(f"REST-Range ends before it starts: {value!r}")
    return start, end


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_date(moment: datetime) -> str:
    """ISO 8601 in UTC with a Z, like the spec examples (2023-06-02T18:24:49.252855Z)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def mask(code: str) -> str:
    return "*" * (len(code) - MASK_VISIBLE_CHARS) + code[-MASK_VISIBLE_CHARS:]


def new_redemption_code() -> str:
    """XXXX-XXXX-XXXX-XXXX, the native format: 16 characters of 36 symbols, about 82 bits."""
    return "-".join("".join(secrets.choice(CODE_ALPHABET) for _ in range(4)) for _ in range(4))


def normalise_code(code: str) -> str:
    return code.strip().upper()


# --------------------------------------------------------------------------------------------
# The store


class ProviderError(Exception):
    """A refusal: becomes an HTTP error with a JSON body ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class OperationRecord:
    """An authorization, settlement or cancellation: ``{oid, value, date}`` on the wire."""

    oid: str
    value: Decimal
    date: datetime
    request_id: str | None = None


@dataclass
class Transaction:
    id: str
    card_id: str
    operation: str  # "Credit" | "Debit"
    value: Decimal
    description: str
    request_id: str
    date: datetime
    authorization: OperationRecord
    order_info: Any = None  # kept as received so tests can see what a hub forwarded
    settlements: list[OperationRecord] = field(default_factory=list)
    cancellations: list[OperationRecord] = field(default_factory=list)
    released: Decimal = Decimal(0)  # cancelled while still held
    refunded: Decimal = Decimal(0)  # cancelled after capture

    @property
    def settled(self) -> Decimal:
        return sum((record.value for record in self.settlements), Decimal(0))

    @property
    def held(self) -> Decimal:
        return self.value - self.settled - self.released

    @property
    def cancellable(self) -> Decimal:
        return self.held + self.settled - self.refunded


@dataclass
class Card:
    id: str
    redemption_code: str
    redemption_token: str
    relation_name: str
    caption: str
    profile_id: str
    currency_code: str
    emission_date: datetime
    expiring_date: datetime
    restricted_to_owner: bool = False
    multiple_redemptions: bool = True
    multiple_credits: bool = True
    balance: Decimal = Decimal(0)
    transactions: dict[str, Transaction] = field(default_factory=dict)
    transaction_ids_by_request: dict[str, str] = field(default_factory=dict)

    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENTS.get(self.currency_code, DEFAULT_EXPONENT)

    def expired(self, now: datetime) -> bool:
        return now >= self.expiring_date

    def has(self, operation: str) -> bool:
        return any(transaction.operation == operation for transaction in self.transactions.values())


@dataclass
class RecordedRequest:
    method: str
    path: str  # full path, prefix included
    route: str | None  # the operationId it matched, None outside the protocol routes
    query: dict[str, str]
    headers: CIMultiDictProxy[str]  # case-insensitive, as received
    body: bytes
    status: int | None = None  # None while in flight or when the connection was dropped

    @property
    def json(self) -> Any:
        return json.loads(self.body, parse_float=Decimal) if self.body else None


@dataclass
class ProviderState:
    """The provider's in-memory store and settings; tests seed and inspect it directly."""

    app_key: str = DEFAULT_APP_KEY
    app_token: str = DEFAULT_APP_TOKEN
    name: str = "ReferenceProvider"  # the `provider` field of _search results
    account: str = "reference"  # first segment of the relative hrefs
    check_redemption: bool = True  # transactions must carry the card's redemptionCode or token
    clock: Callable[[], datetime] = utcnow
    cards: dict[str, Card] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    _card_numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    # ---- seeding and inspection, for tests

    def issue_card(
        self,
        balance: Decimal | str | int | float = 0,
        *,
        redemption_code: str | None = None,
        profile_id: str = "shopper@example.com",
        caption: str = "Reference gift card",
        relation_name: str | None = None,
        currency_code: str = "USD",
        expiring_date: datetime | None = None,
        restricted_to_owner: bool = False,
        multiple_redemptions: bool = True,
        multiple_credits: bool = True,
    ) -> Card:
        """Put a card straight into the store (no transaction is recorded for the balance)."""
        now = self.clock()
        card = Card(
            id=str(next(self._card_numbers)),
            redemption_code=normalise_code(redemption_code or new_redemption_code()),
            redemption_token="".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH)),
            relation_name=relation_name or f"relation-{uuid.uuid4()}",
            caption=caption,
            profile_id=profile_id,
            currency_code=currency_code,
            emission_date=now,
            expiring_date=expiring_date or now + DEFAULT_VALIDITY,
            restricted_to_owner=restricted_to_owner,
            multiple_redemptions=multiple_redemptions,
            multiple_credits=multiple_credits,
            balance=Decimal(str(balance)),  # str() so a float 5.92 means 5.92, not its binary value
        )
        self.cards[card.id] = card
        return card

    def requests_for(self, route: str) -> list[RecordedRequest]:
        """Recorded requests that matched one operation (an operationId, e.g. "GetGiftCardbyID")."""
        return [request for request in self.requests if request.route == route]

    def card(self, card_id: str) -> Card:
        try:
            return self.cards[card_id]
        except KeyError:
            raise ProviderError(404, f"gift card {card_id!r} not found") from None

    def transaction(self, card_id: str, transaction_id: str) -> Transaction:
        try:
            return self.card(card_id).transactions[transaction_id]
        except KeyError:
            raise ProviderError(404, f"transaction {transaction_id!r} not found on card {card_id!r}") from None

    # ---- protocol operations (synchronous: no await between check and change)

    def create_card(self, body: dict) -> Card:
        now = self.clock()
        emission = _date(body, "emissionDate") or now
        return self.issue_card(
            relation_name=_text(body, "relationName"),
            caption=_text(body, "caption"),
            profile_id=_text(body, "profileId"),
            currency_code=_currency(body),
            expiring_date=_date(body, "expiringDate") or emission + DEFAULT_VALIDITY,
            restricted_to_owner=_flag(body, "restrictedToOwner", False),
            multiple_redemptions=_flag(body, "multipleRedemptions", True),
            multiple_credits=_flag(body, "multipleCredits", True),
        )

    def search(self, body: dict) -> list[Card]:
        client, cart = _section(body, "client"), _section(body, "cart")
        owners = {value for key in ("id", "email", "document", "corporateDocument") if (value := client.get(key))}
        code = cart.get("redemptionCode")
        if code is not None and not isinstance(code, str):
            raise ProviderError(400, "cart.redemptionCode must be a string")
        if code:  # a voucher: exactly the card with that code
            candidates = [card for card in self.cards.values() if card.redemption_code == normalise_code(code)]
        else:  # a loyalty programme: the shopper's own cards
            candidates = [card for card in self.cards.values() if card.profile_id in owners]
        now = self.clock()
        return [
            card
            for card in candidates
            if card.balance > 0
            and not card.expired(now)
            and (not card.restricted_to_owner or card.profile_id in owners)
        ]

    def create_transaction(self, card_id: str, body: dict) -> Transaction:
        card = self.card(card_id)
        operation = _operation(body)
        value = _amount(body, "value", card.exponent)
        request_id = _text(body, "requestId")
        replayed = self._replayed_transaction(card, request_id, operation, value)
        if replayed is not None:
            return replayed
        self._check_redemption(card, body)
        self._check_rules(card, operation, value)
        now = self.clock()
        transaction = Transaction(
            id=uuid.uuid4().hex,
            card_id=card.id,
            operation=operation,
            value=value,
            description=_text(body, "description", required=False) or "",
            request_id=request_id,
            date=now,
            authorization=OperationRecord(uuid.uuid4().hex, value, now),
            order_info=body.get("orderInfo"),
        )
        card.balance += value if operation == "Credit" else -value
        card.transactions[transaction.id] = transaction
        card.transaction_ids_by_request[request_id] = transaction.id
        return transaction

    def settle(self, card_id: str, transaction_id: str, body: dict) -> OperationRecord:
        card, transaction = self.card(card_id), self.transaction(card_id, transaction_id)
        value, request_id = _amount(body, "value", card.exponent), _text(body, "requestId")
        replayed = _replayed_operation(transaction.settlements, request_id, value)
        if replayed is not None:
            return replayed
        if value > transaction.held:
            raise ProviderError(400, f"cannot settle {value}: only {transaction.held} is still held")
        record = OperationRecord(uuid.uuid4().hex, value, self.clock(), request_id)
        transaction.settlements.append(record)
        return record

    def cancel(self, card_id: str, transaction_id: str, body: dict) -> OperationRecord:
        card, transaction = self.card(card_id), self.transaction(card_id, transaction_id)
        value, request_id = _amount(body, "value", card.exponent), _text(body, "requestId")
        replayed = _replayed_operation(transaction.cancellations, request_id, value)
        if replayed is not None:
            return replayed
        if value > transaction.cancellable:
            raise ProviderError(400, f"cannot cancel {value}: only {transaction.cancellable} can be cancelled")
        if transaction.operation == "Credit" and value > card.balance:
            raise ProviderError(400, f"cannot cancel {value} of a credit: the balance is {card.balance}")
        release = min(value, transaction.held)
        transaction.released += release
        transaction.refunded += value - release
        card.balance += value if transaction.operation == "Debit" else -value
        record = OperationRecord(uuid.uuid4().hex, value, self.clock(), request_id)
        transaction.cancellations.append(record)
        return record

    # ---- rules

    def _replayed_transaction(self, card: Card, request_id: str, operation: str, value: Decimal) -> Transaction | None:
        existing_id = card.transaction_ids_by_request.get(request_id)
        if existing_id is None:
            return None
        existing = card.transactions[existing_id]
        if (existing.operation, existing.value) != (operation, value):
            raise ProviderError(409, f"requestId {request_id!r} was already used for a different transaction")
        return existing

    def _check_redemption(self, card: Card, body: dict) -> None:
        if not self.check_redemption:
            return
        code, token = body.get("redemptionCode"), body.get("redemptionToken")
        code_matches = isinstance(code, str) and normalise_code(code) == card.redemption_code
        token_matches = isinstance(token, str) and hmac.compare_digest(token.encode(), card.redemption_token.encode())
        if not (code_matches or token_matches):
            raise ProviderError(400, "redemptionCode/redemptionToken do not match the gift card")

    def _check_rules(self, card: Card, operation: str, value: Decimal) -> None:
        if operation == "Debit":
            if card.expired(self.clock()):
                raise ProviderError(400, f"gift card {card.id} expired at {format_date(card.expiring_date)}")
            if not card.multiple_redemptions and card.has("Debit"):
                raise ProviderError(400, f"gift card {card.id} can be redeemed only once")
            if value > card.balance:
                raise ProviderError(400, f"insufficient balance: {card.balance} < {value}")
        elif not card.multiple_credits and card.has("Credit"):
            raise ProviderError(400, f"gift card {card.id} cannot be credited again")


def _replayed_operation(records: list[OperationRecord], request_id: str, value: Decimal) -> OperationRecord | None:
    for record in records:
        if record.request_id == request_id:
            if record.value != value:
                raise ProviderError(409, f"requestId {request_id!r} was already used with value {record.value}")
            return record
    return None


# --------------------------------------------------------------------------------------------
# Reading request fields (lenient on unknown fields, strict on the ones used)


def _text(body: dict, name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ProviderError(400, f"{name} must be a non-empty string")
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ProviderError(400, f"{name} must be a boolean")
    return value


def _date(body: dict, name: str) -> datetime | None:
    value = _text(body, name, required=False)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ProviderError(400, f"{name} must be an ISO 8601 date, got {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # naive dates are UTC


def _currency(body: dict) -> str:
    value = _text(body, "currencyCode", required=False) or "USD"
    if not re.fullmatch(r"[A-Z]{3}", value):
        raise ProviderError(400, f"currencyCode must be an ISO 4217 code, got {value!r}")
    return value


def _operation(body: dict) -> str:
    # NOTES 8.4: the operation comes as Credit/Debit or credit/debit.
    value = body.get("operation")
    if not isinstance(value, str) or value.lower() not in ("credit", "debit"):
        raise ProviderError(400, f"operation must be 'Credit' or 'Debit', got {value!r}")
    return value.capitalize()


def _amount(body: dict, name: str, exponent: int) -> Decimal:
    value = body.get(name)
    # JSON numbers arrive as int or Decimal (parse_float=Decimal); strings and booleans are refused.
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ProviderError(400, f"{name} must be a JSON number, got {value!r}")
    amount = Decimal(value)
    if not amount.is_finite() or amount <= 0 or amount > MAX_AMOUNT:
        raise ProviderError(400, f"{name} must be positive and at most {MAX_AMOUNT}, got {value}")
    try:
        exact = amount == amount.quantize(Decimal(1).scaleb(-exponent))
    except InvalidOperation:
        exact = False
    if not exact:
        raise ProviderError(400, f"{name} has more than {exponent} decimal places: {value}")
    return amount


def _section(body: dict, name: str) -> dict:
    value = body.get(name) or {}
    if not isinstance(value, dict):
        raise ProviderError(400, f"{name} must be an object")
    return value


# --------------------------------------------------------------------------------------------
# Rendering (amounts go out as JSON numbers in major units)


def _card_href(state: ProviderState, card: Card) -> str:
    return f"{state.account}/giftcards/{card.id}"


def _transaction_href(state: ProviderState, transaction: Transaction) -> str:
    return f"{state.account}/giftcards/{transaction.card_id}/transactions/{transaction.id}"


def render_search_item(state: ProviderState, card: Card) -> dict:
    return {"id": card.id, "provider": state.name, "balance": card.balance, "_self": {"href": _card_href(state, card)}}


def render_card(state: ProviderState, card: Card) -> dict:
    return {
        "id": card.id,
        "redemptionToken": card.redemption_token,
        "redemptionCode": mask(card.redemption_code),
        "balance": card.balance,
        "emissionDate": format_date(card.emission_date),
        "expiringDate": format_date(card.expiring_date),
        "currencyCode": card.currency_code,
        "discount": False,  # deprecated, always false (NOTES 7)
        "relationName": card.relation_name,
        "caption": card.caption,
        "transactions": {"href": _card_href(state, card) + "/transactions"},
    }


def render_created_card(card: Card) -> dict:
    """The request echoed with the new id (NOTES 3.4), plus the full redemption code and token:
    extra fields, shown once at creation as the native provider does, so a test that creates a
    card through a hub can transact with it afterwards."""
    return {
        "id": card.id,
        "relationName": card.relation_name,
        "emissionDate": format_date(card.emission_date),
        "expiringDate": format_date(card.expiring_date),
        "caption": card.caption,
        "restrictedToOwner": card.restricted_to_owner,
        "multipleRedemptions": card.multiple_redemptions,
        "multipleCredits": card.multiple_credits,
        "profileId": card.profile_id,
        "currencyCode": card.currency_code,
        "redemptionCode": card.redemption_code,
        "redemptionToken": card.redemption_token,
    }


def render_transaction_ref(state: ProviderState, transaction: Transaction) -> dict:
    return {
        "cardId": transaction.card_id,
        "id": transaction.id,
        "_self": {"href": _transaction_href(state, transaction)},
    }


def render_transaction(state: ProviderState, transaction: Transaction) -> dict:
    href = _transaction_href(state, transaction)
    return {
        "value": transaction.value,
        "description": transaction.description,
        "date": format_date(transaction.date),
        "requestId": transaction.request_id,
        "operation": transaction.operation,
        "settlement": {"href": href + "/settlements"},
        "cancellation": {"href": href + "/cancellations"},
        "authorization": {"href": href + "/authorization"},
    }


def render_record(record: OperationRecord) -> dict:
    return {"oid": record.oid, "value": record.value, "date": format_date(record.date)}


def _encode(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)  # a JSON number; 2-3 decimal places survive float's shortest repr
    raise TypeError(f"cannot encode {type(value).__name__}")


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, default=_encode).encode(),
        content_type="application/json",
        headers={**NO_CACHE, **(headers or {})},
    )


# --------------------------------------------------------------------------------------------
# HTTP


STATE = web.AppKey("provider_state", ProviderState)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _state(request: web.Request) -> ProviderState:
    return request.config_dict[STATE]


async def _read_object(request: web.Request) -> dict:
    if request.content_type not in ACCEPTED_CONTENT_TYPES:
        raise ProviderError(415, f"Content-Type must be application/json or {VND_JSON}, got {request.content_type}")
    try:
        body = json.loads(await request.read(), parse_float=Decimal, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProviderError(400, f"body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ProviderError(400, "body must be a JSON object")
    return body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _ids(request: web.Request) -> tuple[str, str]:
    return request.match_info["giftCardId"], request.match_info["transactionId"]


async def search(request: web.Request) -> web.Response:
    try:
        start, end = parse_rest_range(request.headers.get("REST-Range"))
    except ValueError as error:
        raise ProviderError(400, str(error)) from None
    state = _state(request)
    cards = state.search(await _read_object(request))
    page = cards[start : end + 1]
    # Not in the specs; VTEX APIs usually answer this way (NOTES 2.4).
    content_range = f"resources {start}-{start + len(page) - 1}/{len(cards)}" if page else f"resources */{len(cards)}"
    items = [render_search_item(state, card) for card in page]
    return json_response(items, headers={"REST-Content-Range": content_range})


async def get_card(request: web.Request) -> web.Response:
    state = _state(request)  # a `?ts=` cache buster (NOTES 2.2) is simply ignored
    return json_response(render_card(state, state.card(request.match_info["giftCardId"])))


async def create_card(request: web.Request) -> web.Response:
    return json_response(render_created_card(_state(request).create_card(await _read_object(request))))


async def create_transaction(request: web.Request) -> web.Response:
    state = _state(request)
    transaction = state.create_transaction(request.match_info["giftCardId"], await _read_object(request))
    return json_response(render_transaction_ref(state, transaction))


async def list_transactions(request: web.Request) -> web.Response:
    state = _state(request)
    card = state.card(request.match_info["giftCardId"])
    return json_response([render_transaction_ref(state, transaction) for transaction in card.transactions.values()])


async def get_transaction(request: web.Request) -> web.Response:
    state = _state(request)
    return json_response(render_transaction(state, state.transaction(*_ids(request))))


async def get_authorization(request: web.Request) -> web.Response:
    return json_response(render_record(_state(request).transaction(*_ids(request)).authorization))


async def settle(request: web.Request) -> web.Response:
    return json_response(render_record(_state(request).settle(*_ids(request), await _read_object(request))))


async def list_settlements(request: web.Request) -> web.Response:
    return json_response([render_record(r) for r in _state(request).transaction(*_ids(request)).settlements])


async def cancel(request: web.Request) -> web.Response:
    return json_response(render_record(_state(request).cancel(*_ids(request), await _read_object(request))))


async def list_cancellations(request: web.Request) -> web.Response:
    return json_response([render_record(r) for r in _state(request).transaction(*_ids(request)).cancellations])


_TRANSACTION = "/giftcards/{giftCardId}/transactions/{transactionId}"
ROUTES = (
    web.post("/giftcards/_search", search, name=SEARCH),
    web.get("/giftcards/{giftCardId}", get_card, name=GET_CARD),
    web.post("/giftcards", create_card, name=CREATE_CARD),
    web.post("/giftcards/{giftCardId}/transactions", create_transaction, name=CREATE_TRANSACTION),
    web.get("/giftcards/{giftCardId}/transactions", list_transactions, name=LIST_TRANSACTIONS),
    web.get(_TRANSACTION, get_transaction, name=GET_TRANSACTION),
    web.get(_TRANSACTION + "/authorization", get_authorization, name=GET_AUTHORIZATION),
    web.post(_TRANSACTION + "/cancellations", cancel, name=CANCEL),
    web.get(_TRANSACTION + "/cancellations", list_cancellations, name=LIST_CANCELLATIONS),
    web.post(_TRANSACTION + "/settlements", settle, name=SETTLE),
    web.get(_TRANSACTION + "/settlements", list_settlements, name=LIST_SETTLEMENTS),
)


@web.middleware
async def record_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    record = RecordedRequest(
        method=request.method,
        path=request.path,
        route=request.match_info.route.name,
        query=dict(request.query),
        headers=CIMultiDictProxy(CIMultiDict(request.headers)),
        body=await request.read(),  # aiohttp caches it, handlers can read it again
    )
    _state(request).requests.append(record)
    try:
        response = await handler(request)
    except web.HTTPException as error:
        record.status = error.status
        raise
    except Exception:
        record.status = 500  # aiohttp answers an unhandled error with a 500
        raise
    record.status = response.status
    return response


@web.middleware
async def require_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = _state(request)
    key, token = request.headers.get(APP_KEY_HEADER), request.headers.get(APP_TOKEN_HEADER)
    if not key or not token:
        return web.Response(status=401)  # empty body (NOTES 2.1)
    if not (_same(key, state.app_key) and _same(token, state.app_token)):
        return web.Response(status=403)  # empty body (NOTES 2.1)
    return await handler(request)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not _acceptable(request.headers.get("Accept")):
        return json_response({"error": f"cannot answer in {request.headers['Accept']}"}, status=406)
    try:
        return await handler(request)
    except ProviderError as error:
        return json_response({"error": error.message}, status=error.status)


def _acceptable(accept: str | None) -> bool:
    if not accept:
        return True
    offered = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(offered & ACCEPTABLE_RESPONSE_TYPES)


def check_prefix(prefix: str) -> None:
    # NOTES 2.3: serviceUrl needs a path segment and no trailing slash, or VTEX builds `//` URLs.
    if not prefix.startswith("/") or prefix.endswith("/") or len(prefix) < 2:
        raise ValueError(f"prefix must be like '/provider' (one or more segments, no trailing slash): {prefix!r}")


def build_app(state: ProviderState, *, prefix: str = PREFIX, middlewares: Iterable[Any] = ()) -> web.Application:
    """The provider under ``prefix``; ``middlewares`` run before authentication (faults use it)."""
    check_prefix(prefix)
    protocol = web.Application(middlewares=[*middlewares, require_credentials, answer_errors])
    protocol.add_routes(ROUTES)
    root = web.Application(middlewares=[record_requests])
    root[STATE] = state
    root.add_subapp(prefix, protocol)
    return root


# --------------------------------------------------------------------------------------------
# Running it


@dataclass(frozen=True)
class RunningProvider:
    base_url: str  # http://127.0.0.1:PORT
    prefix: str  # /provider
    state: ProviderState

    @property
    def service_url(self) -> str:
        """What a hub registers as ``serviceUrl``: protocol paths are appended to it."""
        return self.base_url + self.prefix

    @property
    def app_key(self) -> str:
        return self.state.app_key

    @property
    def app_token(self) -> str:
        return self.state.app_token

    def url(self, protocol_path: str) -> str:
        """``url("/giftcards/7")`` -> ``http://127.0.0.1:PORT/provider/giftcards/7``."""
        return self.service_url + protocol_path

    def headers(self, media_type: str = VND_JSON, **overrides: str) -> dict[str, str]:
        """Headers a hub sends: credentials plus Accept/Content-Type; ``overrides`` replace any."""
        return {
            APP_KEY_HEADER: self.app_key,
            APP_TOKEN_HEADER: self.app_token,
            "Accept": media_type,
            "Content-Type": media_type,
            **overrides,
        }


@asynccontextmanager
async def start_reference_provider(
    *, prefix: str = PREFIX, state: ProviderState | None = None, **state_options: Any
) -> AsyncIterator[RunningProvider]:
    """Serve a reference provider on 127.0.0.1 (ephemeral port) while the block runs.

    ``state_options`` are ProviderState fields (app_key, app_token, name, account, check_redemption, clock).
    """
    state = state or ProviderState(**state_options)
    async with serve(build_app(state, prefix=prefix)) as base_url:
        yield RunningProvider(base_url, prefix, state)


@pytest.fixture
async def reference_provider() -> AsyncIterator[RunningProvider]:
    """A fresh reference provider per test; import this name into a test module to use it."""
    async with start_reference_provider() as provider:
        yield provider
