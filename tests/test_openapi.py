"""Our own OpenAPI document: valid OpenAPI 3.0.3, complete, and true to what the service answers.

Real answers over loopback HTTP are checked against the schemas the served document declares for
their status, so a renderer that drifts from its declaration fails here.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from hub.http.openapi import route_path
from hub.http.state import SETTINGS
from tests.openapi import to_json_schema
from tests.providers.reference import start_reference_provider

HUB = "/api/giftcardproviders"
CAUGHT_UP_TIMEOUT_S = 30.0
NOT_A_CARD = "00000000-0000-4000-8000-000000000000"


async def served_document(service) -> dict[str, Any]:
    async with service.session.get(service.base_url + "/openapi.json") as response:
        assert response.status == 200
        return await response.json()


def schema_errors(document: dict[str, Any], schema: dict[str, Any], body: Any) -> list[str]:
    validator = jsonschema.Draft4Validator(to_json_schema(schema, document))  # 3.0's dialect is Draft 4 based
    return [f"{list(error.absolute_path)}: {error.message}" for error in validator.iter_errors(body)]


class Checked:
    """Calls the service and checks each answer against the response the document declares for it."""

    def __init__(self, service, document: dict[str, Any]) -> None:
        self.service = service
        self.document = document
        self.seen: set[tuple[str, str, int]] = set()

    async def call(self, method: str, template: str, status: int, body: Any = None, **ids: str) -> Any:
        path = template.format(**ids)
        got, answer, headers = await self.service.call(method, path, body)
        assert got == status, (method, path, got, answer)
        declared = self.document["paths"][template][method.lower()]["responses"][str(status)]
        content = declared.get("content", {})
        if "application/json" in content:
            errors = schema_errors(self.document, content["application/json"]["schema"], answer)
            assert errors == [], f"{method} {path} {status} does not match its schema: {errors}\n{answer}"
        else:
            assert answer is None, f"{method} {path} {status} documents no JSON body, got {answer}"
        for header in declared.get("headers", {}):
            assert header in headers, f"{method} {path} {status} documents {header}, did not send it"
        self.seen.add((method, template, status))
        return answer


async def test_served_document_is_valid_openapi_3_0(service):
    document = await served_document(service)
    assert document["openapi"] == "3.0.3"
    validate(document)  # raises, naming the first error


async def test_every_route_is_in_the_document_with_its_methods(service):
    document = await served_document(service)
    served = {
        (route.method, route_path(route))
        for route in service.app.router.routes()
        if route.method != "HEAD" and not route_path(route).startswith("/docs/static")  # aiohttp's, the viewer's files
    }
    shown = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert served - shown == set(), "served but not documented"
    assert shown - served == set(), "documented but not served"
    undocumented = [key for key in served if document["paths"][key[1]][key[0].lower()]["tags"] == ["Undocumented"]]
    assert undocumented == []


async def test_every_json_answer_and_body_has_a_schema(service):
    document = await served_document(service)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                for media in response.get("content", {}).values():
                    assert "schema" in media, (method, path, status)
            if method in ("post", "put") and not path.endswith(("/retry", "/cards")):
                assert "requestBody" in operation, (method, path)
    put = document["paths"][HUB + "/{provider_id}"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    fields = document["components"]["schemas"][put["$ref"].rsplit("/", 1)[1]]
    assert {"serviceUrl", "appKey", "appToken"} <= set(fields["properties"]) and fields["required"] == ["serviceUrl"]


async def test_parameters_are_the_ones_the_handlers_read(service):
    document = await served_document(service)
    listing = document["paths"]["/api/ledger/transactions"]["get"]["parameters"]
    assert [(p["in"], p["name"]) for p in listing] == [
        ("header", "REST-Range"),
        *(("query", name) for name in ("card", "provider", "operation", "orderId", "since", "until")),
    ]
    get_card = document["paths"]["/native/giftcards/{card_id}"]["get"]["parameters"]
    assert [(p["in"], p["name"]) for p in get_card] == [("path", "card_id"), ("query", "ts")]
    search = document["paths"][HUB + "/{provider_id}/giftcards/_search"]["post"]["parameters"]
    assert [(p["in"], p["name"]) for p in search] == [
        ("path", "provider_id"),
        ("header", "REST-Range"),
        ("query", "an"),
    ]


# ---- real answers against their declared schemas ---------------------------------------------


async def card_flow(check: Checked, base: str, create: dict[str, Any], **ids: str) -> str:
    """Every gift card operation on one surface; returns the card's id."""
    card = await check.call("POST", base + "/giftcards", 200, create, **ids)
    ids = {**ids, "card_id": card["id"]}
    await check.call("POST", base + "/giftcards/_search", 200, {"cart": {"redemptionCode": "NO-SUCH-CODE"}}, **ids)
    transactions = base + "/giftcards/{card_id}/transactions"
    credit = {"operation": "Credit", "value": 100, "requestId": "credit-1"}
    await check.call("POST", transactions, 200, credit, **ids)
    order_info = {"orderId": "o-1", "cart": {"grandTotal": 30.5}, "clientProfile": {"email": "a@example.com"}}
    debit = {"operation": "Debit", "value": 30.5, "requestId": "debit-1", "orderInfo": order_info}
    ids["transaction_id"] = (await check.call("POST", transactions, 200, debit, **ids))["id"]
    await check.call("GET", base + "/giftcards/{card_id}", 200, **ids)
    await check.call("GET", transactions, 200, **ids)
    transaction = transactions + "/{transaction_id}"
    assert (await check.call("GET", transaction, 200, **ids))["orderInfo"]["orderId"] == "o-1"
    await check.call("GET", transaction + "/authorization", 200, **ids)
    await check.call("POST", transaction + "/settlements", 200, {"value": 10, "requestId": "s-1"}, **ids)
    await check.call("GET", transaction + "/settlements", 200, **ids)
    await check.call("POST", transaction + "/cancellations", 200, {"value": 5, "requestId": "c-1"}, **ids)
    await check.call("GET", transaction + "/cancellations", 200, **ids)
    # Refusals, in the error shape: malformed, unknown, over the balance, a requestId reused.
    await check.call("POST", transactions, 400, {"operation": "Debit"}, **ids)
    await check.call("GET", base + "/giftcards/{card_id}", 404, **{**ids, "card_id": NOT_A_CARD})
    await check.call("POST", transactions, 422, {"operation": "Debit", "value": 1000, "requestId": "d-big"}, **ids)
    await check.call("POST", transactions, 409, {**credit, "value": 7}, **ids)
    return card["id"]


async def wait_until_projected(service) -> None:
    deadline = time.monotonic() + CAUGHT_UP_TIMEOUT_S
    while True:
        status, body, _ = await service.call("GET", "/api/projections")
        if status == 200 and all(item["lagEvents"] == 0 for item in body["items"]):
            return
        assert time.monotonic() < deadline, f"projections not caught up: {body}"
        await asyncio.sleep(0.05)


async def test_real_answers_match_their_declared_schemas(service):
    document = await served_document(service)
    check = Checked(service, document)
    card = {"relationName": "r-native", "caption": "c", "profileId": "p-1"}
    card_id = await card_flow(check, "/native", card)
    await card_flow(check, "/api", {**card, "relationName": "r-api", "expiringDate": "2030-01-01T00:00:00Z"})
    native = service.app[SETTINGS].native_provider_id
    await card_flow(check, HUB + "/{provider_id}", {**card, "relationName": "r-hub"}, provider_id=native)
    # A search that finds one card (a usable one: with money), on each surface's shape.
    found_card = await check.call("POST", "/native/giftcards", 200, {**card, "relationName": "r-found"})
    load = {"operation": "Credit", "value": 1, "requestId": "found-1"}
    await check.call("POST", "/native/giftcards/{card_id}/transactions", 200, load, card_id=found_card["id"])
    found = {"cart": {"redemptionCode": found_card["redemptionCode"]}}
    for template, ids in (("/native", {}), ("/api", {}), (HUB + "/{provider_id}", {"provider_id": native})):
        answer = await check.call("POST", template + "/giftcards/_search", 200, found, **ids)
        assert found_card["id"] in json.dumps(answer)
    await check.call("POST", "/api/giftcards/_batches", 200, {"count": 2, "value": 10})
    # The same operations behind the account, where a store's links point (the env pair's own tenant).
    account = {"account": service.app[SETTINGS].default_tenant}
    await card_flow(check, "/{account}/native", {**card, "relationName": "r-native-a"}, **account)
    expiring = {"expiringDate": "2030-01-01T00:00:00Z"}
    await card_flow(check, "/{account}/api", {**card, "relationName": "r-api-a", **expiring}, **account)
    hub_in_account = "/{account}" + HUB
    await card_flow(
        check, hub_in_account + "/{provider_id}", {**card, "relationName": "r-hub-a"}, provider_id=native, **account
    )
    for template in ("/{account}/native", "/{account}/api", hub_in_account + "/{provider_id}"):
        await check.call("POST", template + "/giftcards/_search", 200, found, provider_id=native, **account)
    await check.call("GET", hub_in_account, 200, **account)
    await check.call("GET", hub_in_account + "/{provider_id}", 200, provider_id=native, **account)
    await check.call("POST", hub_in_account + "/_search", 200, found, **account)

    async with start_reference_provider() as provider:
        registration = {
            "serviceUrl": provider.service_url,
            "caption": "Acme cards",
            "appKey": provider.app_key,
            "appToken": provider.app_token,
        }
        await check.call("PUT", HUB + "/{provider_id}", 200, registration, provider_id="Acme")
        await check.call("PUT", HUB + "/{provider_id}", 400, {"caption": "no url"}, provider_id="Acme")
        await check.call("GET", HUB, 200)
        await check.call("GET", HUB + "/{provider_id}", 200, provider_id="Acme")
        await check.call("POST", HUB + "/_search", 200, found)
        external = {**card, "relationName": "r-acme", "expiringDate": "2030-01-01T00:00:00Z"}
        created = await check.call("POST", HUB + "/{provider_id}/giftcards", 200, external, provider_id="Acme")
        await check.call(
            "GET", HUB + "/{provider_id}/giftcards/{card_id}", 200, provider_id="Acme", card_id=created["id"]
        )
        await check.call("PUT", hub_in_account + "/{provider_id}", 200, registration, provider_id="Acme", **account)
        await check.call("DELETE", HUB + "/{provider_id}", 200, provider_id="Acme")
        await check.call("DELETE", HUB + "/{provider_id}", 404, provider_id="Acme")

    await wait_until_projected(service)
    await check.call("GET", "/api/ledger/balances", 200)
    await check.call("GET", "/api/ledger/balances/{card_id}", 200, card_id=card_id)
    transactions = await check.call("GET", "/api/ledger/transactions", 200)
    assert any(item["settlements"] and item["cancellations"] for item in transactions["items"])
    await check.call("GET", "/api/ledger/daily-totals", 200)
    await check.call("GET", "/api/projections", 200)
    await check.call("GET", "/api/audit/cards/{card_id}", 200, card_id=card_id)

    webhook = await check.call("POST", "/api/webhooks", 200, {"url": "http://127.0.0.1:9/hook", "events": None})
    await check.call("GET", "/api/webhooks", 200)
    await check.call("GET", "/api/webhooks/{webhook_id}", 200, webhook_id=webhook["id"])
    await check.call("GET", "/api/webhooks/{webhook_id}/dead-letters", 200, webhook_id=webhook["id"])
    await check.call("POST", "/api/webhooks/{webhook_id}/dead-letters/retry", 200, webhook_id=webhook["id"])
    await check.call("POST", "/api/webhooks/{webhook_id}/replay", 200, {"fromPosition": 0}, webhook_id=webhook["id"])
    await check.call("DELETE", "/api/webhooks/{webhook_id}", 200, webhook_id=webhook["id"])

    await check.call("GET", "/healthz", 200)
    await check.call("GET", "/readyz", 200)

    json_successes = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if "application/json" in operation["responses"].get("200", {}).get("content", {})
    }
    checked = {(method, template) for method, template, status in check.seen if status == 200}
    assert json_successes - checked == {("GET", "/openapi.json")}  # checked by the validator instead


async def test_schemas_refuse_an_answer_that_drifts(service):
    """The check above can fail: a card with a text balance, or without its id, does not match."""
    document = await served_document(service)
    status, card, _ = await service.call(
        "POST", "/native/giftcards", {"relationName": "r", "caption": "c", "profileId": "p"}
    )
    schema = document["paths"]["/native/giftcards"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert status == 200 and schema_errors(document, schema, card) == []
    assert schema_errors(document, schema, {**card, "balance": "0"}) != []
    assert schema_errors(document, schema, {k: v for k, v in card.items() if k != "id"}) != []


# ---- the parameters each operation documents are the ones it reads -------------------------


async def test_rest_range_is_documented_where_it_is_read(service):
    """A malformed REST-Range is a 400 naming it exactly on the operations that document it."""
    document = await served_document(service)
    native = service.app[SETTINGS].native_provider_id
    _, card, _ = await service.call(
        "POST", "/native/giftcards", {"relationName": "r", "caption": "c", "profileId": "p"}
    )
    credit = {"operation": "Credit", "value": 5, "requestId": "r-1"}
    _, transaction, _ = await service.call("POST", f"/native/giftcards/{card['id']}/transactions", credit)
    _, webhook, _ = await service.call("POST", "/api/webhooks", {"url": "http://127.0.0.1:9/hook"})
    ids = {
        "card_id": card["id"],
        "transaction_id": transaction["id"],
        "provider_id": native,
        "webhook_id": webhook["id"],
    }
    reading = [
        (method, path)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if path.startswith(("/native", "/api")) and (method == "get" or path.endswith("/_search"))
    ]
    assert len(reading) > 30
    for method, path in reading:
        documented = any(p["name"] == "REST-Range" for p in document["paths"][path][method]["parameters"])
        body = {"cart": {"redemptionCode": "NO-SUCH-CODE"}} if method == "post" else None
        status, answer, _ = await service.call(
            method.upper(), path.format(**ids), body, headers={"REST-Range": "rows 1 to 3"}
        )
        refused = status == 400 and "REST-Range" in answer["error"]["message"]
        assert refused == documented, (method, path, status, answer)


BAD_VALUES = {"date-time": "yesterday", "date": "31/01/2026"}


def bad_value(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return "not-one-of-them"
    return BAD_VALUES.get(schema.get("format"), "")


async def test_documented_query_filters_are_read_and_checked(service):
    """Each documented filter with a constraint is read: a value outside it is a 400 naming the filter.
    VTEX's ts and an are accepted and ignored."""
    document = await served_document(service)
    _, card, _ = await service.call(
        "POST", "/native/giftcards", {"relationName": "r", "caption": "c", "profileId": "p"}
    )
    credit = {"operation": "Credit", "value": 5, "requestId": "r-1"}
    _, transaction, _ = await service.call("POST", f"/native/giftcards/{card['id']}/transactions", credit)
    native = service.app[SETTINGS].native_provider_id
    ids = {"card_id": card["id"], "transaction_id": transaction["id"], "provider_id": native}
    filters = 0
    for path, item in document["paths"].items():
        if not path.startswith("/api") or "get" not in item:
            continue
        for parameter in item["get"]["parameters"]:
            if parameter["in"] != "query":
                continue
            name, target = parameter["name"], path.format(**ids)
            if name in ("ts", "an"):
                status, _, _ = await service.call("GET", f"{target}?{name}=639091131481342036")
                assert status == 200, (path, name, status)
                continue
            filters += 1
            status, answer, _ = await service.call("GET", f"{target}?{name}={bad_value(parameter['schema'])}")
            assert status == 400 and name in answer["error"]["message"], (path, name, status, answer)
    assert filters == 14  # balances 2, transactions 6, daily totals 4, the audit's asOf and tenant


async def test_unknown_provider_answers_in_the_error_shape(service):
    document = await served_document(service)
    check = Checked(service, document)
    await check.call(
        "GET", HUB + "/{provider_id}/giftcards/{card_id}", 404, provider_id="Nobody", card_id=str(uuid.uuid4())
    )
    assert json.dumps(document).count('"Undocumented"') == 0
    with pytest.raises(AssertionError):
        await check.call("GET", "/api/giftcards/{card_id}", 200, card_id=NOT_A_CARD)
