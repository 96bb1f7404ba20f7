"""The test infrastructure itself: the spec validator, the reference provider and the faulty one.

Everything goes over real loopback HTTP. Responses of the reference provider must validate against
gift-card-provider-protocol.json (tests needing ../shared/spec skip when it is absent); the
validator must reject wrong bodies; the faulty provider must fail exactly as configured.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from tests import openapi
from tests.openapi import SpecViolation, operation, operations, validate_request, validate_response
from tests.providers import reference
from tests.providers.faulty import (
    MAX_SLOW_S,
    Fault,
    RunningFaultyProvider,
    faulty_provider,  # noqa: F401 -- pytest fixture, requested by name below
    start_faulty_provider,
)
from tests.providers.reference import (
    APP_KEY_HEADER,
    APP_TOKEN_HEADER,
    OPERATION_IDS,
    ROUTES,
    VND_JSON,
    RunningProvider,
    parse_rest_range,
    reference_provider,  # noqa: F401 -- pytest fixture, requested by name below
    start_reference_provider,
)

CLIENT_TIMEOUT_S = 0.2  # how long the client waits in the slow-fault test
SLOW_FAULT_S = 1.0  # comfortably longer than CLIENT_TIMEOUT_S

SPEC = "provider"


# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
async def provider() -> AsyncIterator[RunningProvider]:
    async with start_reference_provider() as running:
        yield running


@pytest.fixture
async def faulty() -> AsyncIterator[RunningFaultyProvider]:
    async with start_faulty_provider(slow_s=SLOW_FAULT_S) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@dataclass
class Reply:
    status: int
    headers: Any
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw, parse_float=Decimal)


async def send(
    session: aiohttp.ClientSession,
    provider: RunningProvider,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> Reply:
    data = None if body is None else json.dumps(body, default=float)
    timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
    request_headers = provider.headers() if headers is None else headers
    async with session.request(
        method, provider.url(path), data=data, headers=request_headers, timeout=timeout
    ) as response:
        return Reply(response.status, response.headers, await response.read())


async def call(session, provider, operation_id: str, body: Any = None, **params: str) -> Any:
    """Call one Provider Protocol operation by operationId, on the path the spec gives it; check both ways."""
    op = operation(SPEC, operation_id)
    if body is not None:
        validate_request(SPEC, operation_id, body)  # our own test data must follow the spec too
    reply = await send(session, provider, op.method, op.url_path(**params), body)
    assert reply.status == 200, (operation_id, reply.status, reply.raw)
    assert reply.headers["Content-Type"].startswith("application/json")
    validate_response(SPEC, operation_id, 200, reply.json)
    return reply.json


def search_body(redemption_code: str = "", client_id: str = "shopper@example.com") -> dict:
    return {
        "client": {"id": client_id, "email": client_id, "document": "12345678900"},
        "cart": {
            "grandTotal": Decimal("182.50"),
            "relationName": None,
            "redemptionCode": redemption_code,
            "discounts": Decimal("20.00"),
            "shipping": Decimal("2.50"),
            "taxes": 0,
            "items": [
                {
                    "productId": "2000000",
                    "id": "2000002",
                    "refId": "MEV41",
                    "name": "Shoes",
                    "price": 200,
                    "quantity": 1,
                }
            ],
            "itemsTotal": 200,
        },
    }


def transaction_body(card: dict, operation_name: str, value: Decimal | str, request_id: str) -> dict:
    return {
        "operation": operation_name,
        "value": Decimal(value),
        "description": "GiftCardHub",
        "redemptionToken": card["redemptionToken"],
        "redemptionCode": card["redemptionCode"],
        "requestId": request_id,
        "orderInfo": {
            "orderId": "v500",
            "sequence": 5006128,
            "cart": {
                "items": [
                    {
                        "id": "2001023",
                        "productId": "2000492",
                        "refId": "35994",
                        "name": "Vaporizador",
                        "value": Decimal("14.99"),
                        "price": Decimal("14.99"),
                        "quantity": 1,
                        "shippingDiscount": 0,
                        "discount": Decimal("-7.5"),
                        "priceTags": [{"name": "discount@price", "value": Decimal("-7.5")}],
                    }
                ],
                "grandTotal": Decimal("14.76"),
                "discounts": Decimal("-7.5"),
                "shipping": Decimal("7.27"),
                "taxes": 0,
                "itemsTotal": Decimal("14.99"),
            },
            "clientProfile": {
                "email": "michael.scott96@mail.com",
                "firstName": "Michael",
                "lastName": "Scott",
                "document": "02906792063",
                "phone": "+551111111111",
                "birthDate": "0001-01-01T00:00:00",
                "isCorporate": False,
            },
            "shipping": {
                "receiverName": "Michael Scott",
                "postalCode": "22250040",
                "city": "Rio de Janeiro",
                "state": "RJ",
                "country": "BRA",
                "street": "Praia de Botafogo",
                "number": "111",
                "neighborhood": "Botafogo",
                "complement": None,
                "reference": None,
            },
        },
    }


def create_card_body(**overrides: Any) -> dict:
    return {
        "relationName": "loyalty-program",
        "emissionDate": "2026-01-01T00:00:00Z",
        "expiringDate": "2099-01-01T00:00:00Z",
        "caption": "Loyalty Program",
        "restrictedToOwner": False,
        "multipleRedemptions": True,
        "multipleCredits": True,
        "profileId": "shopper@example.com",
        "currencyCode": "USD",
        **overrides,
    }


def seeded_card(provider: RunningProvider, balance: str = "100.00", **options: Any) -> dict:
    card = provider.state.issue_card(balance, **options)
    return {"id": card.id, "redemptionCode": card.redemption_code, "redemptionToken": card.redemption_token}


# --------------------------------------------------------------------------------------------
# The reference provider against the Provider Protocol spec


async def test_routes_are_exactly_the_provider_protocol_operations():
    spec_routes = {(op.method, op.path.replace("{tId}", "{transactionId}"), op.operation_id) for op in operations(SPEC)}
    app_routes = {(route.method, route.path, route.kwargs["name"]) for route in ROUTES}
    assert app_routes == spec_routes
    assert set(OPERATION_IDS) == {op.operation_id for op in operations(SPEC)}


async def create_transaction(session, provider, card: dict, operation_name: str, value: str, request_id: str) -> Any:
    body = transaction_body(card, operation_name, value, request_id)
    return await call(session, provider, "CreateGiftCardTransaction", body, giftCardId=card["id"])


async def test_all_eleven_operations_answer_bodies_that_match_the_spec(provider, session):
    created = await call(session, provider, "CreateGiftCard", create_card_body())
    card_id = created["id"]
    assert created["caption"] == "Loyalty Program" and created["profileId"] == "shopper@example.com"

    credit = await create_transaction(session, provider, created, "Credit", "100.00", "r1")
    assert credit["cardId"] == card_id

    [found] = await call(session, provider, "ListAllGiftCards", search_body(created["redemptionCode"]))
    assert (found["id"], found["balance"], found["provider"]) == (card_id, Decimal("100.0"), "ReferenceProvider")

    card = await call(session, provider, "GetGiftCardbyID", giftCardId=card_id)
    assert card["balance"] == Decimal("100.0")
    assert card["redemptionCode"].endswith(created["redemptionCode"][-4:]) and card["redemptionCode"].startswith("*")

    debit = await create_transaction(session, provider, created, "Debit", "40.25", "r2")
    ids = {"giftCardId": card_id, "transactionId": debit["id"], "tId": debit["id"]}

    listed = await call(session, provider, "ListAllGiftCardTransactions", giftCardId=card_id)
    assert [entry["id"] for entry in listed] == [credit["id"], debit["id"]]

    detail = await call(session, provider, "GetGiftCardTransactionbyID", **ids)
    assert (detail["operation"], detail["value"], detail["requestId"]) == ("Debit", Decimal("40.25"), "r2")

    authorization = await call(session, provider, "GetGiftCardTransactionAuthorization", **ids)
    assert authorization["value"] == Decimal("40.25")

    assert await call(session, provider, "ListAllGiftCardTransactionsSettlements", **ids) == []
    settled = await call(
        session, provider, "CreateGiftCardTransactionSettlement", {"value": 30, "requestId": "s1"}, **ids
    )
    assert settled["value"] == 30
    assert await call(session, provider, "ListAllGiftCardTransactionsSettlements", **ids) == [settled]

    assert await call(session, provider, "ListAllGiftCardTransactionsCancellations", **ids) == []
    cancelled = await call(
        session,
        provider,
        "CreateGiftCardTransactionCancellation",
        {"value": Decimal("10.25"), "requestId": "c1"},
        **ids,
    )
    assert await call(session, provider, "ListAllGiftCardTransactionsCancellations", **ids) == [cancelled]

    card = await call(session, provider, "GetGiftCardbyID", giftCardId=card_id)
    assert card["balance"] == Decimal("70.0")  # 100 - 40.25 + 10.25
    called = {request.route for request in provider.state.requests}
    assert called == {op.operation_id for op in operations(SPEC)}


@pytest.mark.parametrize("media_type", [VND_JSON, "application/json", "application/json; charset=utf-8"])
async def test_both_json_media_types_are_accepted(provider, session, media_type):
    reply = await send(
        session, provider, "POST", "/giftcards", create_card_body(), headers=provider.headers(media_type)
    )
    assert reply.status == 200
    assert reply.headers["Cache-Control"] == "no-cache,no-store"


async def test_other_media_types_are_refused_with_a_reason(provider, session):
    reply = await send(
        session,
        provider,
        "POST",
        "/giftcards",
        create_card_body(),
        headers=provider.headers(**{"Content-Type": "text/plain"}),
    )
    assert reply.status == 415 and "Content-Type" in reply.json["error"]
    reply = await send(session, provider, "GET", "/giftcards/1", headers=provider.headers(**{"Accept": "text/html"}))
    assert reply.status == 406


AUTH_CASES = {
    "no credentials": ({}, 401),
    "no token": ({APP_KEY_HEADER: reference.DEFAULT_APP_KEY}, 401),
    "no key": ({APP_TOKEN_HEADER: reference.DEFAULT_APP_TOKEN}, 401),
    "empty values": ({APP_KEY_HEADER: "", APP_TOKEN_HEADER: ""}, 401),
    "wrong key": ({APP_KEY_HEADER: "nope", APP_TOKEN_HEADER: reference.DEFAULT_APP_TOKEN}, 403),
    "wrong token": ({APP_KEY_HEADER: reference.DEFAULT_APP_KEY, APP_TOKEN_HEADER: "nope"}, 403),
}


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.kwargs["name"])
async def test_credentials_missing_give_401_and_wrong_give_403_with_empty_bodies(provider, session, route):
    path = route.path.format(giftCardId="1", transactionId="t1")
    body = {} if route.method == "POST" else None
    for case, (credentials, status) in AUTH_CASES.items():
        reply = await send(
            session, provider, route.method, path, body, headers={"Content-Type": VND_JSON, **credentials}
        )
        assert (case, reply.status, reply.raw) == (case, status, b"")
    assert all(request.status in (401, 403) for request in provider.state.requests)


async def test_search_returns_an_empty_array_for_zero_balance_and_expired_cards(provider, session):
    zero = seeded_card(provider, "0")
    assert await call(session, provider, "ListAllGiftCards", search_body(zero["redemptionCode"])) == []
    expired = seeded_card(provider, "10", expiring_date=provider.state.clock() - timedelta(seconds=1))
    assert await call(session, provider, "ListAllGiftCards", search_body(expired["redemptionCode"])) == []
    assert await call(session, provider, "ListAllGiftCards", search_body("NO-SUCH-CODE")) == []


async def test_search_by_owner_respects_restricted_cards(provider, session):
    mine = seeded_card(provider, "5", profile_id="me@example.com", restricted_to_owner=True)
    assert (
        await call(session, provider, "ListAllGiftCards", search_body(mine["redemptionCode"], "other@example.com"))
        == []
    )
    [found] = await call(session, provider, "ListAllGiftCards", search_body(mine["redemptionCode"], "me@example.com"))
    assert found["id"] == mine["id"]
    loyalty = await call(session, provider, "ListAllGiftCards", search_body("", "me@example.com"))
    assert [card["id"] for card in loyalty] == [mine["id"]]


@pytest.mark.parametrize("rest_range", ["resources=1-2", "1-2", " resources = 1 - 2 "])
async def test_search_pages_with_rest_range_in_both_forms(provider, session, rest_range):
    cards = [seeded_card(provider, "5", profile_id="loyal@example.com") for _ in range(5)]
    headers = provider.headers(**{"REST-Range": rest_range})
    reply = await send(
        session, provider, "POST", "/giftcards/_search", search_body("", "loyal@example.com"), headers=headers
    )
    assert reply.status == 200
    validate_response(SPEC, "ListAllGiftCards", 200, reply.json)
    assert [card["id"] for card in reply.json] == [cards[1]["id"], cards[2]["id"]]
    assert reply.headers["REST-Content-Range"] == "resources 1-2/5"
    assert provider.state.requests_for("ListAllGiftCards")[-1].headers["rest-range"] == rest_range.strip()


@pytest.mark.parametrize("rest_range", ["bogus", "resources=5-1", "resources=-1-3", "items=0-9"])
async def test_search_refuses_a_malformed_rest_range(provider, session, rest_range):
    headers = provider.headers(**{"REST-Range": rest_range})
    reply = await send(session, provider, "POST", "/giftcards/_search", search_body(), headers=headers)
    assert reply.status == 400 and "REST-Range" in reply.json["error"]


def test_parse_rest_range_reads_both_forms_and_defaults():
    assert parse_rest_range(None) == (0, 49)
    assert parse_rest_range("") == (0, 49)
    assert parse_rest_range("resources=0-49") == (0, 49)
    assert parse_rest_range("RESOURCES=10-19") == (10, 19)
    assert parse_rest_range("3-3") == (3, 3)
    with pytest.raises(ValueError):
        parse_rest_range("resources=9-0")


async def test_get_card_ignores_cache_buster_and_unknown_headers_and_records_them(provider, session):
    card = seeded_card(provider)
    vtex_headers = {
        "x-vtex-operation-id": "6c0b2b4e-4f3e-4a0b-9d8a-2a3c1b0e9f11",
        "x-vtex-debug-id": "",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "baggage": "userId=alice",
    }
    reply = await send(
        session,
        provider,
        "GET",
        f"/giftcards/{card['id']}?ts=639091131481342036",
        headers=provider.headers(**vtex_headers),
    )
    assert reply.status == 200 and reply.json["id"] == card["id"]
    [recorded] = provider.state.requests_for("GetGiftCardbyID")
    assert (recorded.method, recorded.path, recorded.query) == (
        "GET",
        f"/provider/giftcards/{card['id']}",
        {"ts": "639091131481342036"},
    )
    assert recorded.headers["X-VTEX-Operation-Id"] == vtex_headers["x-vtex-operation-id"]
    assert recorded.headers["x-provider-api-appkey"] == provider.app_key
    assert recorded.status == 200


async def test_requests_outside_the_prefix_are_recorded_too(provider, session):
    async with session.get(provider.base_url + "/giftcards/1", headers=provider.headers()) as reply:
        assert reply.status == 404
    [recorded] = provider.state.requests
    assert (recorded.route, recorded.path, recorded.status) == (None, "/giftcards/1", 404)


async def test_unknown_cards_and_transactions_are_404_with_a_reason(provider, session):
    assert (await send(session, provider, "GET", "/giftcards/999")).status == 404
    card = seeded_card(provider)
    reply = await send(session, provider, "GET", f"/giftcards/{card['id']}/transactions/nope/settlements")
    assert reply.status == 404 and "nope" in reply.json["error"]


async def test_debits_never_overdraw_and_request_ids_are_idempotent(provider, session):
    card = seeded_card(provider, "50.00")
    path = f"/giftcards/{card['id']}/transactions"

    too_much = await send(session, provider, "POST", path, transaction_body(card, "Debit", "50.01", "a"))
    assert too_much.status == 400 and "insufficient" in too_much.json["error"]

    first = await send(session, provider, "POST", path, transaction_body(card, "debit", "20", "b"))
    again = await send(session, provider, "POST", path, transaction_body(card, "Debit", "20", "b"))
    assert first.status == again.status == 200 and first.json == again.json
    assert provider.state.cards[card["id"]].balance == Decimal("30.00")

    conflict = await send(session, provider, "POST", path, transaction_body(card, "Debit", "21", "b"))
    assert conflict.status == 409 and "requestId" in conflict.json["error"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"value": "10.00"}, "JSON number"),
        ({"value": True}, "JSON number"),
        ({"value": 0}, "positive"),
        ({"value": Decimal("-1")}, "positive"),
        ({"value": Decimal("1.001")}, "decimal places"),
        ({"operation": "Refund"}, "operation"),
        ({"requestId": ""}, "requestId"),
        ({"redemptionCode": "WRONG-CODE", "redemptionToken": "wrong"}, "redemption"),
    ],
)
async def test_bad_transactions_are_400_with_a_reason(provider, session, change, message):
    card = seeded_card(provider)
    body = {**transaction_body(card, "Debit", "1", "x"), **change}
    reply = await send(session, provider, "POST", f"/giftcards/{card['id']}/transactions", body)
    assert reply.status == 400 and message in reply.json["error"]
    assert provider.state.cards[card["id"]].balance == Decimal("100.00")


async def test_settlements_and_cancellations_respect_the_transaction_value(provider, session):
    card = seeded_card(provider, "100")
    debit = await send(
        session, provider, "POST", f"/giftcards/{card['id']}/transactions", transaction_body(card, "Debit", "50", "d")
    )
    base = f"/giftcards/{card['id']}/transactions/{debit.json['id']}"

    assert (
        await send(session, provider, "POST", base + "/settlements", {"value": 30, "requestId": "s1"})
    ).status == 200
    replay = await send(session, provider, "POST", base + "/settlements", {"value": 30, "requestId": "s1"})
    assert replay.status == 200 and len((await send(session, provider, "GET", base + "/settlements")).json) == 1
    assert (
        await send(session, provider, "POST", base + "/settlements", {"value": 31, "requestId": "s1"})
    ).status == 409
    over = await send(session, provider, "POST", base + "/settlements", {"value": 21, "requestId": "s2"})
    assert over.status == 400 and "held" in over.json["error"]

    # 20 still held: cancelling 25 releases those 20 and refunds 5 of the 30 captured.
    assert (
        await send(session, provider, "POST", base + "/cancellations", {"value": 25, "requestId": "c1"})
    ).status == 200
    transaction = provider.state.transaction(card["id"], debit.json["id"])
    assert (transaction.released, transaction.refunded, transaction.held) == (20, 5, 0)
    assert (await send(session, provider, "POST", base + "/settlements", {"value": 1, "requestId": "s3"})).status == 400
    over = await send(session, provider, "POST", base + "/cancellations", {"value": 26, "requestId": "c2"})
    assert over.status == 400 and "cancel" in over.json["error"]
    assert (
        await send(session, provider, "POST", base + "/cancellations", {"value": 25, "requestId": "c2"})
    ).status == 200
    assert provider.state.cards[card["id"]].balance == Decimal("100")  # the whole debit came back


async def test_cancelling_a_credit_debits_the_card_but_never_below_zero(provider, session):
    card = seeded_card(provider, "0")
    path = f"/giftcards/{card['id']}/transactions"
    credit = await send(session, provider, "POST", path, transaction_body(card, "Credit", "30", "c"))
    await send(session, provider, "POST", path, transaction_body(card, "Debit", "25", "d"))
    base = f"{path}/{credit.json['id']}/cancellations"
    refused = await send(session, provider, "POST", base, {"value": 10, "requestId": "x1"})
    assert refused.status == 400 and "balance" in refused.json["error"]
    assert (await send(session, provider, "POST", base, {"value": 5, "requestId": "x2"})).status == 200
    assert provider.state.cards[card["id"]].balance == 0


async def test_the_exported_fixture_serves_a_provider_under_a_path_prefix(reference_provider, session):  # noqa: F811
    assert reference_provider.service_url.endswith("/provider")
    assert (await send(session, reference_provider, "GET", "/giftcards/1")).status == 404


async def test_custom_credentials_and_prefix(session):
    async with start_reference_provider(prefix="/v1/giftcard", app_key="k", app_token="t") as custom:
        assert custom.service_url == custom.base_url + "/v1/giftcard"
        reply = await send(session, custom, "POST", "/giftcards", create_card_body())
        assert reply.status == 200
        wrong = await send(session, custom, "GET", "/giftcards/1", headers={APP_KEY_HEADER: "k", APP_TOKEN_HEADER: "x"})
        assert wrong.status == 403
    with pytest.raises(ValueError, match="prefix"):
        reference.check_prefix("/provider/")


# --------------------------------------------------------------------------------------------
# The validator must reject what the spec forbids (or it proves nothing)


@pytest.mark.parametrize(
    ("operation_id", "body", "complaint"),
    [
        ("GetGiftCardbyID", {"id": "1", "balance": "10.00"}, "is not of type 'number'"),
        ("GetGiftCardbyID", [{"id": "1"}], "is not of type 'object'"),
        ("ListAllGiftCards", {"id": "1", "provider": "p", "balance": 1, "_self": {"href": "h"}}, "not of type 'array'"),
        ("ListAllGiftCards", [{"id": "1", "provider": "p", "balance": 1}], "'_self' is a required property"),
        ("ListAllGiftCards", [{"id": "1", "provider": "p", "balance": 1, "_self": {}}], "'href' is a required"),
        ("CreateGiftCardTransaction", {"cardId": 1, "id": "t", "_self": {"href": "h"}}, "is not of type 'string'"),
        ("CreateGiftCardTransactionSettlement", {"oid": "o", "value": 1}, "'date' is a required property"),
        ("ListAllGiftCardTransactionsSettlements", [{"oid": "o"}], "'value' is a required property"),
        ("ListAllGiftCardTransactionsCancellations", [{"oid": "o", "value": "1", "date": "d"}], "not of type 'number'"),
        ("CreateGiftCard", {"id": "1", "restrictedToOwner": "yes"}, "is not of type 'boolean'"),
    ],
)
def test_validate_response_rejects_wrong_bodies(operation_id, body, complaint):
    with pytest.raises(SpecViolation, match=complaint):
        validate_response(SPEC, operation_id, 200, body)


def test_validate_response_accepts_a_right_body_and_extra_fields():
    validate_response(
        SPEC, "GetGiftCardTransactionAuthorization", 200, {"oid": "o", "value": 5.92, "date": "2019-03-18T14:42:32Z"}
    )
    validate_response(
        SPEC,
        "ListAllGiftCards",
        "200",
        [{"id": "1", "provider": "p", "balance": 5, "_self": {"href": "h"}, "caption": "x"}],
    )


def test_validate_response_rejects_undocumented_statuses_and_unexpected_bodies():
    with pytest.raises(SpecViolation, match="status 404 is not documented"):
        validate_response(SPEC, "GetGiftCardbyID", 404, {"error": "not found"})
    validate_response("hub", "DeleteGiftCardProviderbyID", 200, None)
    with pytest.raises(SpecViolation, match="documents no body"):
        validate_response("hub", "DeleteGiftCardProviderbyID", 200, {"deleted": True})
    with pytest.raises(KeyError, match="no operation"):
        validate_response(SPEC, "NoSuchOperation", 200, {})
    with pytest.raises(KeyError, match="unknown spec"):
        validate_response("nope", "GetGiftCardbyID", 200, {})


def test_validate_request_checks_required_fields_and_nullable():
    body = search_body("CODE-1234")
    validate_request(SPEC, "ListAllGiftCards", body)  # cart.relationName is null: nullable in this spec
    with pytest.raises(SpecViolation, match="relationName"):
        validate_request(SPEC, "ListAllGiftCards", {**body, "cart": {**body["cart"], "relationName": 5}})
    with pytest.raises(SpecViolation, match="'requestId' is a required property"):
        validate_request(SPEC, "CreateGiftCardTransactionSettlement", {"value": 1})
    with pytest.raises(SpecViolation, match="'null' is not of type 'string'|None is not of type 'string'"):
        validate_request(
            "gift-card-api.json",
            "CreateGiftCard",
            {"relationName": None, "expiringDate": "x", "caption": "c", "profileId": "p"},
        )


def test_spec_names_may_be_keys_or_file_names():
    assert openapi.spec_key("gift-card-hub-api") == openapi.spec_key("gift-card-hub-api.json") == "hub"
    assert len(operations("provider")) == 11 and len(operations("hub")) == 15 and len(operations("native")) == 11


# --------------------------------------------------------------------------------------------
# Tolerated deviations: each is needed, each is narrow


def test_every_deviation_targets_an_existing_schema_and_changes_it():
    for deviation in openapi.DEVIATIONS:
        original = openapi.resolve_pointer(openapi.load_spec(deviation.spec), deviation.pointer)
        patched = openapi.resolve_pointer(openapi.patched_spec(deviation.spec), deviation.pointer)
        assert patched != original, deviation
        assert "NOTES" in deviation.reason


def test_every_example_in_the_three_specs_validates():
    checked = 0
    for spec in openapi.SPEC_FILES:
        for operation_id, where, example in openapi.examples(spec):
            if where == "request":
                validate_request(spec, operation_id, example)
            else:
                validate_response(spec, operation_id, where, example)
            checked += 1
    assert checked >= 30


SETTLE_RECORD = {"oid": "e122", "value": 1.8, "date": "2019-03-18T14:42:32.1291783Z"}


def test_hub_settle_may_answer_an_array_or_one_object_but_each_is_checked():
    validate_response("hub", "CreateGiftCardSettlementTransaction", 200, [SETTLE_RECORD])
    validate_response("hub", "CreateGiftCardSettlementTransaction", 200, SETTLE_RECORD)
    with pytest.raises(SpecViolation):
        validate_response("hub", "CreateGiftCardSettlementTransaction", 200, [{"oid": "e122"}])
    with pytest.raises(SpecViolation):
        validate_response(
            "hub", "CreateGiftCardSettlementTransaction", 200, {"oid": "e122", "value": "1.8", "date": "d"}
        )


def test_hub_price_tags_are_an_array_and_amounts_may_be_decimals_but_counts_not():
    card = {"redemptionCode": "ABCD-EFGH", "redemptionToken": "token"}
    body = transaction_body(card, "Debit", "14.76", "r")
    validate_request("hub", "CreateGiftCardTransaction", body)
    validate_request(SPEC, "CreateGiftCardTransaction", body)
    validate_request("native", "CreateGiftCardTransaction", body)
    item = body["orderInfo"]["cart"]["items"][0]
    wrong_tag = {**item, "priceTags": [{"name": 1, "value": 0}]}
    fractional_quantity = {**item, "quantity": 1.5}
    for bad_item in (wrong_tag, fractional_quantity):
        bad = {**body, "orderInfo": {**body["orderInfo"], "cart": {**body["orderInfo"]["cart"], "items": [bad_item]}}}
        for spec in ("hub", SPEC, "native"):
            with pytest.raises(SpecViolation):
                validate_request(spec, "CreateGiftCardTransaction", bad)


def test_hub_search_accepts_null_relation_name_and_decimal_totals():
    validate_request("hub", "GetGiftCardfromGiftCardProvider", search_body("CODE-1234"))
    with pytest.raises(SpecViolation):
        validate_request("hub", "GetGiftCardfromGiftCardProvider", {"client": {}, "cart": {"grandTotal": "182"}})


def test_hub_provider_self_is_an_object_with_a_string_href():
    provider = {
        "id": "p",
        "serviceUrl": "https://x/y",
        "oauthProvider": "vtex",
        "preAuthEnabled": True,
        "cancelEnabled": True,
    }
    for operation_id in ("GetGiftCardProviderbyID", "Create/UpdateGiftCardProviderbyID"):
        validate_response("hub", operation_id, 200, {**provider, "_self": {"href": "acct/giftcardproviders/p"}})
        with pytest.raises(SpecViolation):
            validate_response("hub", operation_id, 200, {**provider, "_self": [{"href": "acct/giftcardproviders/p"}]})
        with pytest.raises(SpecViolation):
            validate_response("hub", operation_id, 200, {**provider, "_self": {"href": 7}})


def test_hub_create_card_link_may_be_transaction_or_transactions():
    base = {"id": "38", "provider": "p", "discount": False}
    for key in ("transaction", "transactions"):
        validate_response("hub", "CreateGiftCardinGiftCardProvider", 200, {**base, key: {"href": "a/b"}})
        with pytest.raises(SpecViolation):
            validate_response("hub", "CreateGiftCardinGiftCardProvider", 200, {**base, key: {"href": 38}})


def test_require_spec_skips_with_the_reason_when_the_folder_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(openapi, "SPEC_DIR", tmp_path / "no-spec-here")
    with pytest.raises(pytest.skip.Exception, match="specs not found"):
        openapi.require_spec()
    assert openapi.spec_dir() == tmp_path / "no-spec-here"


# --------------------------------------------------------------------------------------------
# The faulty provider


async def test_faulty_provider_is_healthy_until_told_otherwise(faulty, session):
    card = seeded_card(faulty)
    reply = await send(session, faulty, "GET", f"/giftcards/{card['id']}")
    assert reply.status == 200 and reply.json["balance"] == 100
    assert faulty.faults.served == []


async def test_slow_fault_outlasts_the_client_timeout_then_answers_normally(faulty, session):
    card = seeded_card(faulty)
    faulty.faults.set(Fault.SLOW)
    with pytest.raises(TimeoutError):
        await send(session, faulty, "GET", f"/giftcards/{card['id']}", timeout_s=CLIENT_TIMEOUT_S)
    started = time.monotonic()
    reply = await send(session, faulty, "GET", f"/giftcards/{card['id']}", timeout_s=SLOW_FAULT_S * 5)
    assert reply.status == 200 and reply.json["id"] == card["id"]
    assert time.monotonic() - started >= SLOW_FAULT_S


async def test_http_500_fault(faulty, session):
    faulty.faults.set(Fault.HTTP_500)
    reply = await send(session, faulty, "POST", "/giftcards", create_card_body())
    assert reply.status == 500 and "injected" in reply.json["error"]
    assert faulty.state.cards == {}  # the request never reached the provider


async def test_malformed_json_fault(faulty, session):
    faulty.faults.set(Fault.MALFORMED_JSON, route="ListAllGiftCards")
    reply = await send(session, faulty, "POST", "/giftcards/_search", search_body())
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/json")
    with pytest.raises(ValueError):
        reply.json  # noqa: B018 -- decoding is the point


async def test_wrong_shape_fault_fails_validation_on_every_route(faulty, session):
    faulty.faults.set(Fault.WRONG_SHAPE)
    for route in ROUTES:
        body = {} if route.method == "POST" else None
        reply = await send(session, faulty, route.method, route.path.format(giftCardId="1", transactionId="t"), body)
        assert reply.status == 200
        with pytest.raises(SpecViolation):
            validate_response(SPEC, route.kwargs["name"], 200, reply.json)
    assert len(faulty.faults.served) == len(ROUTES)


async def test_reset_fault_drops_the_connection(faulty, session):
    faulty.faults.set(Fault.RESET)
    with pytest.raises(aiohttp.ClientConnectionError):
        await send(session, faulty, "POST", "/giftcards", create_card_body())
    assert faulty.state.requests[-1].status is None  # no response was ever written


async def test_faults_can_target_one_route(faulty, session):
    card = seeded_card(faulty)
    faulty.faults.set(Fault.HTTP_500, route="GetGiftCardbyID")
    assert (await send(session, faulty, "GET", f"/giftcards/{card['id']}")).status == 500
    assert (
        await send(session, faulty, "POST", "/giftcards/_search", search_body(card["redemptionCode"]))
    ).status == 200
    # A healthy route rule wins over a global fault.
    faulty.faults.set(Fault.RESET)
    faulty.faults.set(Fault.HEALTHY, route="ListAllGiftCards")
    assert (
        await send(session, faulty, "POST", "/giftcards/_search", search_body(card["redemptionCode"]))
    ).status == 200


async def test_a_fault_for_n_requests_heals_by_itself(faulty, session):
    card = seeded_card(faulty)
    faulty.faults.set(Fault.HTTP_500, times=2)
    statuses = [(await send(session, faulty, "GET", f"/giftcards/{card['id']}")).status for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert faulty.faults.served == [("GetGiftCardbyID", Fault.HTTP_500)] * 2


async def test_a_broken_provider_recovers_when_healed_at_runtime(faulty, session):
    card = seeded_card(faulty)
    faulty.faults.set(Fault.RESET)
    for _ in range(3):
        with pytest.raises(aiohttp.ClientConnectionError):
            await send(session, faulty, "GET", f"/giftcards/{card['id']}")
    faulty.faults.heal()
    reply = await send(session, faulty, "GET", f"/giftcards/{card['id']}")
    assert reply.status == 200 and reply.json["id"] == card["id"]


async def test_fault_settings_are_checked(faulty):
    with pytest.raises(ValueError, match="unknown route"):
        faulty.faults.set(Fault.HTTP_500, route="GetGiftCard")
    with pytest.raises(ValueError, match="slow_s"):
        faulty.faults.set(Fault.SLOW, slow_s=MAX_SLOW_S + 1)
    with pytest.raises(ValueError, match="times"):
        faulty.faults.set(Fault.SLOW, times=0)


async def test_faults_come_before_authentication(faulty, session):
    faulty.faults.set(Fault.HTTP_500)
    assert (await send(session, faulty, "GET", "/giftcards/1", headers={})).status == 500
    faulty.faults.heal()
    assert (await send(session, faulty, "GET", "/giftcards/1", headers={})).status == 401


async def test_the_exported_faulty_fixture_starts_healthy(faulty_provider, session):  # noqa: F811
    assert (await send(session, faulty_provider, "GET", "/giftcards/1")).status == 404
    faulty_provider.faults.set(Fault.SLOW, slow_s=0.05)
    assert (await send(session, faulty_provider, "GET", "/giftcards/1")).status == 404
    assert faulty_provider.faults.served == [("GetGiftCardbyID", Fault.SLOW)]
