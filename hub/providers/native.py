"""The native provider in process: the 11 Provider Protocol operations on the ledger, answered in
the protocol's shapes.

``/native`` and ``/api/giftcards`` serve these over HTTP (``hub.http.native``); the hub calls them
in process for the native provider, with no HTTP hop, as it calls an external provider over HTTP
(``hub.providers.external``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from hub.config import Settings
from hub.paging import content_range, page_of, parse_rest_range
from hub.providers.lookup_throttle import LookupThrottle
from hub.wire import (
    CreateCardRequest,
    CreateTransactionRequest,
    OperationRequest,
    SearchRequest,
    decode,
    format_datetime,
    order_info_client,
    order_info_for_wire,
    parse_datetime,
)
from ledger.application.commands import IssueCard, IssuedCard, Ledger, parse_card_id
from ledger.domain.codes import mask_code
from ledger.domain.errors import InvalidRequest
from ledger.domain.giftcard import Client, GiftCard, Operation, Transaction
from ledger.domain.money import to_major


class Surface(Enum):
    PROTOCOL = "protocol"
    GIFTCARD_API = "giftcard-api"


@dataclass(frozen=True)
class Hrefs:
    """Relative links in the form VTEX callers follow: ``{base}/giftcards/{id}/transactions/{tid}``."""

    base: str

    def card(self, card_id: str) -> str:
        return f"{self.base}/giftcards/{card_id}"

    def transactions(self, card_id: str) -> str:
        return f"{self.card(card_id)}/transactions"

    def transaction(self, card_id: str, transaction_id: str) -> str:
        return f"{self.transactions(card_id)}/{transaction_id}"


def render_card(card: GiftCard, hrefs: Hrefs, token: str, redemption_code: str | None = None) -> dict[str, Any]:
    """A card as GET returns it: its token in full; the full code only on creation, masked ever after."""
    card_id = str(card.id)
    link = {"href": hrefs.transactions(card_id)}
    return {
        "id": card_id,
        "redemptionToken": token,
        "redemptionCode": redemption_code or mask_code(card.code_tail),
        "balance": to_major(card.balance, card.currency),
        "relationName": card.relation_name,
        "caption": card.caption,
        "emissionDate": format_datetime(card.emission_date),
        "expiringDate": format_datetime(card.expiring_date),
        "currencyCode": card.currency,
        "discount": False,
        "transaction": link,
        "transactions": link,
    }


def render_created_for_protocol(card: GiftCard, redemption_code: str) -> dict[str, Any]:
    """The Provider Protocol's create answer echoes the request plus ``id`` (and the code, once)."""
    return {
        "id": str(card.id),
        "relationName": card.relation_name,
        "emissionDate": format_datetime(card.emission_date),
        "expiringDate": format_datetime(card.expiring_date),
        "caption": card.caption,
        "restrictedToOwner": card.restricted_to_owner,
        "multipleRedemptions": card.multiple_redemptions,
        "multipleCredits": card.multiple_credits,
        "profileId": card.profile_id,
        "currencyCode": card.currency,
        "redemptionCode": redemption_code,
    }


def render_transaction_ref(card_id: str, transaction: Transaction, hrefs: Hrefs) -> dict[str, Any]:
    return {"cardId": card_id, "id": transaction.id, "_self": {"href": hrefs.transaction(card_id, transaction.id)}}


def render_transaction(
    card: GiftCard, transaction: Transaction, hrefs: Hrefs, order_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A transaction as GET returns it; ``orderInfo`` only when the caller sent one with it."""
    card_id = str(card.id)
    href = hrefs.transaction(card_id, transaction.id)
    rendered = {
        "cardId": card_id,
        "id": transaction.id,
        "operation": transaction.operation,
        "value": to_major(transaction.value, card.currency),
        "description": transaction.description,
        "date": format_datetime(transaction.date),
        "requestId": transaction.request_id,
        "settlement": {"href": f"{href}/settlements"},
        "cancellation": {"href": f"{href}/cancellations"},
        "authorization": {"href": f"{href}/authorization"},
    }
    if order_info is not None:
        rendered["orderInfo"] = order_info_for_wire(order_info)
    return rendered


def render_operation(card: GiftCard, operation: Operation) -> dict[str, Any]:
    return {
        "oid": operation.oid,
        "value": to_major(operation.value, card.currency),
        "date": format_datetime(operation.date),
    }


def render_authorization(card: GiftCard, transaction: Transaction) -> dict[str, Any]:
    return {
        "oid": transaction.id,
        "value": to_major(transaction.value, card.currency),
        "date": format_datetime(transaction.date),
    }


def search_client(body: SearchRequest) -> Client:
    c = body.client
    if c is None:
        return Client()
    return Client(id=c.id, email=c.email, document=c.document, corporate_document=c.corporate_document)


async def find_usable_cards(
    ledger: Ledger, body: SearchRequest, throttle: LookupThrottle, caller: str
) -> list[GiftCard]:
    """A voucher by its code (exactly one, or none), else the client's loyalty cards.

    A card with no money or outside its validity is never offered: VTEX's checkout
    breaks on ``balance: 0``. A restricted card found by code needs its owner named.
    Codes that match nothing count against the (caller, shopper) pair (see hub.providers.lookup_throttle).
    """
    client = search_client(body)
    now = ledger.clock()
    code = body.cart.redemption_code if body.cart else None
    if code and code.strip():
        subjects = throttle.subjects(caller, client)
        await throttle.check(subjects)
        card = await ledger.find_by_code(code)
        if card is None or (card.restricted_to_owner and not card.is_owned_by(client)):
            await throttle.record_failure(subjects, caller)
            return []
        candidates = [card]
    else:
        candidates = await ledger.find_by_owner(client)
    return [card for card in candidates if card.is_usable(now)]


def default_expiry(emission: datetime, validity_days: int) -> datetime:
    try:
        return emission + timedelta(days=validity_days)
    except OverflowError:
        raise InvalidRequest(
            f"emissionDate {emission.isoformat()} leaves no room for the default validity; send expiringDate"
        ) from None


class NativeProvider:
    """The 11 Provider Protocol operations on the ledger, returning the protocol's shapes.

    ``/native`` serves these over HTTP; the hub calls them in process for the native
    provider, with no HTTP hop. Bodies arrive as raw JSON bytes and are decoded here.
    """

    def __init__(self, ledger: Ledger, settings: Settings, hrefs: Hrefs, throttle: LookupThrottle, caller: str) -> None:
        self.ledger = ledger
        self.settings = settings
        self.hrefs = hrefs
        self.throttle = throttle
        self.caller = caller  # the app key that called: code lookups are throttled per caller and shopper

    async def search(self, body: bytes, rest_range: str | None) -> tuple[list[dict[str, Any]], dict[str, str]]:
        request = decode(body, SearchRequest)
        window = parse_rest_range(rest_range)
        cards = await find_usable_cards(self.ledger, request, self.throttle, self.caller)
        page = page_of(cards, window)
        items = [
            {
                "id": str(c.id),
                "provider": self.settings.native_provider_id,
                "balance": to_major(c.balance, c.currency),
                "caption": c.caption,
                "relationName": c.relation_name,
                "currencyCode": c.currency,
                "redemptionToken": self.ledger.redemption_token(str(c.id)),
                "_self": {"href": self.hrefs.card(str(c.id))},
            }
            for c in page
        ]
        return items, content_range(window, len(page), len(cards))

    async def issue(self, body: bytes, metadata: dict[str, Any], *, expiring_required: bool) -> IssuedCard:
        request = decode(body, CreateCardRequest)
        now = self.ledger.clock()
        emission = parse_datetime(request.emission_date, "emissionDate") if request.emission_date else now
        if request.expiring_date:
            expiring = parse_datetime(request.expiring_date, "expiringDate")
        elif expiring_required:
            raise InvalidRequest("expiringDate is required")
        else:
            expiring = default_expiry(emission, self.settings.default_validity_days)
        return await self.ledger.issue(
            IssueCard(
                relation_name=request.relation_name,
                caption=request.caption,
                profile_id=request.profile_id,
                currency=request.currency_code or self.settings.default_currency,
                emission_date=emission,
                expiring_date=expiring,
                restricted_to_owner=request.restricted_to_owner,
                multiple_credits=request.multiple_credits,
                multiple_redemptions=request.multiple_redemptions,
            ),
            metadata=metadata,
        )

    async def create_card(self, body: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
        """The protocol's echo of the request, and the whole card beside it (balance, token, links):
        what typed clients read from a create through a hub, as from the native API's."""
        issued = await self.issue(body, metadata, expiring_required=False)
        return {
            **self.render_issued(issued),
            **render_created_for_protocol(issued.card, issued.redemption_code),
        }

    def render_issued(self, issued: IssuedCard) -> dict[str, Any]:
        card_id = str(issued.card.id)
        return render_card(issued.card, self.hrefs, self.ledger.redemption_token(card_id), issued.redemption_code)

    async def get_card(self, card_id: str) -> dict[str, Any]:
        card = await self.ledger.card(card_id)
        return render_card(card, self.hrefs, self.ledger.redemption_token(str(card.id)))

    async def list_transactions(self, card_id: str) -> list[dict[str, Any]]:
        card = await self.ledger.card(card_id)
        return [render_transaction_ref(str(card.id), t, self.hrefs) for t in card.transactions.values()]

    async def create_transaction(self, card_id: str, body: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
        request = decode(body, CreateTransactionRequest)
        profile = order_info_client(request.order_info)
        transaction = await self.ledger.create_transaction(
            card_id,
            operation=request.operation,
            value=request.value,
            description=request.description,
            request_id=request.request_id,
            order_info=request.order_info,
            client=Client(email=profile.email, document=profile.document) if profile else None,
            redemption_code=request.redemption_code,
            redemption_token=request.redemption_token,
            metadata=metadata,
        )
        return render_transaction_ref(parse_card_id(card_id), transaction, self.hrefs)

    async def get_transaction(self, card_id: str, transaction_id: str) -> dict[str, Any]:
        card = await self.ledger.card(card_id)
        transaction = card.transaction(transaction_id)
        order_info = await self.ledger.order_info(card_id, transaction.id)
        return render_transaction(card, transaction, self.hrefs, order_info)

    async def get_authorization(self, card_id: str, transaction_id: str) -> dict[str, Any]:
        card = await self.ledger.card(card_id)
        return render_authorization(card, card.transaction(transaction_id))

    async def list_settlements(self, card_id: str, transaction_id: str) -> list[dict[str, Any]]:
        card = await self.ledger.card(card_id)
        return [render_operation(card, op) for op in card.transaction(transaction_id).settlements]

    async def list_cancellations(self, card_id: str, transaction_id: str) -> list[dict[str, Any]]:
        card = await self.ledger.card(card_id)
        return [render_operation(card, op) for op in card.transaction(transaction_id).cancellations]

    async def settle(self, card_id: str, transaction_id: str, body: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
        request = decode(body, OperationRequest)
        operation = await self.ledger.settle(
            card_id, transaction_id, value=request.value, request_id=request.request_id, metadata=metadata
        )
        return render_operation(await self.ledger.card(card_id), operation)

    async def cancel(self, card_id: str, transaction_id: str, body: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
        request = decode(body, OperationRequest)
        operation = await self.ledger.cancel(
            card_id, transaction_id, value=request.value, request_id=request.request_id, metadata=metadata
        )
        return render_operation(await self.ledger.card(card_id), operation)
