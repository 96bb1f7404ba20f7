"""The native provider over real loopback HTTP: both VTEX surfaces, end to end."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import aiohttp
import pytest

from hub.paging import PAGE_ITEMS_DEFAULT
from tests.cards import count_events

pytestmark = pytest.mark.also_on_citus

VND = "application/vnd.vtex.giftcards.v1+json"


async def create_card(service, base="/native", **fields):
    body = {
        "relationName": fields.pop("relationName", f"rel-{id(fields)}-{asyncio.get_running_loop().time()}"),
        "caption": "Loyalty",
        "profileId": "shopper@example.com",
        "expiringDate": "2027-01-01T00:00:00",
        "currencyCode": "USD",
        **fields,
    }
    status, card, _ = await service.call("POST", f"{base}/giftcards", body)
    assert status == 200, card
    return card


async def transact(service, base, card_id, operation, value, request_id, **extra):
    return await service.call(
        "POST",
        f"{base}/giftcards/{card_id}/transactions",
        {"operation": operation, "value": value, "description": "test", "requestId": request_id, **extra},
    )


@pytest.mark.parametrize("base", ["/native", "/api"])
async def test_vtex_worked_example_over_http(service, base):
    card = await create_card(service, base)
    card_id = card["id"]
    assert (await service.call("GET", f"{base}/giftcards/{card_id}"))[1]["balance"] == 0
    assert (await transact(service, base, card_id, "Credit", 500, "1"))[0] == 200
    status, debit, _ = await transact(service, base, card_id, "Debit", 120, "2")
    assert status == 200 and debit["cardId"] == card_id
    status, cancellation, _ = await service.call(
        "POST", f"{base}/giftcards/{card_id}/transactions/{debit['id']}/cancellations", {"value": 20, "requestId": "4"}
    )
    assert status == 200 and cancellation["value"] == 20
    assert (await service.call("GET", f"{base}/giftcards/{card_id}"))[1]["balance"] == 400
    status, replay, _ = await transact(service, base, card_id, "Credit", 500, "1")
    assert status == 200
    assert (await service.call("GET", f"{base}/giftcards/{card_id}"))[1]["balance"] == 400
    listed = (await service.call("GET", f"{base}/giftcards/{card_id}/transactions"))[1]
    assert {t["id"] for t in listed} == {replay["id"], debit["id"]}


async def test_hub_checkout_sequence_against_native(service):
    card = await create_card(service)
    code = card["redemptionCode"]
    await transact(service, "/native", card["id"], "Credit", 100, "load")

    status, found, _ = await service.call(
        "POST",
        "/native/giftcards/_search",
        {"client": {"id": "c1", "email": "x@example.com", "document": "1"}, "cart": {"redemptionCode": code}},
        headers={"Content-Type": VND, "Accept": VND},
    )
    assert status == 200 and [f["id"] for f in found] == [card["id"]]
    assert found[0]["balance"] == 100 and found[0]["provider"] == "VtexGiftCard"

    status, got, _ = await service.call("GET", f"/native/giftcards/{card['id']}?ts=639091131481342036")
    assert status == 200 and got["id"] == card["id"] and got["balance"] == 100

    status, debit, _ = await transact(service, "/native", card["id"], "Debit", 60, "order-1")
    assert status == 200
    tx = f"/native/giftcards/{card['id']}/transactions/{debit['id']}"
    assert (await service.call("GET", f"{tx}/authorization"))[1]["value"] == 60

    assert (await service.call("GET", f"{tx}/settlements"))[1] == []
    first = (await service.call("POST", f"{tx}/settlements", {"value": 25, "requestId": "s1"}))[1]
    second = (await service.call("POST", f"{tx}/settlements", {"value": 15, "requestId": "s2"}))[1]
    settlements = (await service.call("GET", f"{tx}/settlements"))[1]
    assert [s["oid"] for s in settlements] == [first["oid"], second["oid"]]
    assert sum(s["value"] for s in settlements) == 40

    assert (await service.call("GET", f"{tx}/cancellations"))[1] == []
    await service.call("POST", f"{tx}/cancellations", {"value": 30, "requestId": "c1"})  # 20 held + 10 refund
    await service.call("POST", f"{tx}/cancellations", {"value": 30, "requestId": "c2"})  # 30 refund
    cancellations = (await service.call("GET", f"{tx}/cancellations"))[1]
    assert sum(c["value"] for c in cancellations) == 60
    status, error, _ = await service.call("POST", f"{tx}/cancellations", {"value": 1, "requestId": "c3"})
    assert status == 422 and error["error"]["code"] == "over_cancellation"
    assert (await service.call("GET", f"/native/giftcards/{card['id']}"))[1]["balance"] == 100

    detail = (await service.call("GET", tx))[1]
    assert detail["operation"] == "Debit" and detail["value"] == 60 and detail["requestId"] == "order-1"
    assert detail["settlement"]["href"].endswith("/settlements")


async def test_redemption_code_is_shown_once_then_masked(service):
    for base in ("/native", "/api"):
        card = await create_card(service, base)
        code = card["redemptionCode"]
        assert "*" not in code and len(code) == 19
        got = (await service.call("GET", f"{base}/giftcards/{card['id']}"))[1]
        assert got["redemptionCode"] == "*" * 15 + code[-4:]
        assert code not in str(got)


@pytest.mark.parametrize("base", ["/native", "/api"])
async def test_the_token_is_the_cards_own_and_shown_in_full_by_every_read(service, base):
    card = await create_card(service, base, profileId="token-holder@example.com")
    other = await create_card(service, base, profileId="token-holder@example.com")
    token = card["redemptionToken"]
    assert token not in (card["redemptionCode"], other["redemptionToken"]) and "*" not in token
    assert (await service.call("GET", f"{base}/giftcards/{card['id']}"))[1]["redemptionToken"] == token
    await transact(service, base, card["id"], "Credit", 10, "load")
    search = {"client": {"email": "token-holder@example.com"}, "cart": {}}
    found = (await service.call("POST", f"{base}/giftcards/_search", search))[1]
    items = found if base == "/native" else found["items"]
    assert [(i["id"], i["redemptionToken"]) for i in items] == [(card["id"], token)]


@pytest.mark.parametrize("base", ["/native", "/api"])
@pytest.mark.parametrize("operation", ["Debit", "Credit"])
async def test_a_transaction_naming_another_cards_code_or_token_is_refused_and_writes_nothing(
    service, pool, base, operation
):
    card = await create_card(service, base)
    other = await create_card(service, base)
    code, token = card["redemptionCode"], card["redemptionToken"]
    assert (await transact(service, base, card["id"], "Credit", 100, "load", redemptionCode=code))[0] == 200
    before = await count_events(pool)
    masked = (await service.call("GET", f"{base}/giftcards/{card['id']}"))[1]["redemptionCode"]
    wrong = [
        ({"redemptionCode": other["redemptionCode"]}, "redemption_code_mismatch", "redemptionCode"),
        ({"redemptionCode": masked}, "redemption_code_mismatch", "redemptionCode"),
        ({"redemptionCode": code, "redemptionToken": other["redemptionToken"]}, "redemption_token_mismatch", "redemptionToken"),
        ({"redemptionToken": code}, "redemption_token_mismatch", "redemptionToken"),  # the code is not the token
        ({"redemptionToken": "é" * 32}, "redemption_token_mismatch", "redemptionToken"),  # not ASCII: not a 500
    ]  # fmt: skip
    for fields, error, field in wrong:
        status, body, _ = await transact(service, base, card["id"], operation, 10, "order", **fields)
        assert status == 400 and body["error"]["code"] == error and field in body["error"]["message"], body
    assert await count_events(pool) == before
    # Nothing was recorded under the requestId either: it is free for the right code, typed as a shopper might.
    typed = code.lower().replace("-", "")
    status, _, _ = await transact(
        service, base, card["id"], operation, 10, "order", redemptionCode=typed, redemptionToken=token
    )
    assert status == 200
    status, _, _ = await transact(
        service, base, card["id"], operation, 10, "empty", redemptionCode="", redemptionToken=""
    )
    assert status == 200
    balance = (await service.call("GET", f"{base}/giftcards/{card['id']}"))[1]["balance"]
    assert balance == (80 if operation == "Debit" else 120)


async def test_search_by_client_skips_empty_expired_and_other_cards(service, clock):
    funded = await create_card(service, profileId="loyal@example.com")
    await transact(service, "/native", funded["id"], "Credit", 10, "load")
    await create_card(service, profileId="loyal@example.com")  # balance 0: never offered
    short = await create_card(
        service, profileId="loyal@example.com", expiringDate=(clock.now + timedelta(days=1)).isoformat()
    )
    await transact(service, "/native", short["id"], "Credit", 10, "load")
    await create_card(service, profileId="someone-else@example.com")

    search = {"client": {"id": "x", "email": "loyal@example.com", "document": "1"}, "cart": {}}
    found = (await service.call("POST", "/native/giftcards/_search", search))[1]
    assert {f["id"] for f in found} == {funded["id"], short["id"]}
    clock.advance(timedelta(days=2))
    found = (await service.call("POST", "/native/giftcards/_search", search))[1]
    assert [f["id"] for f in found] == [funded["id"]]
    assert (await service.call("POST", "/native/giftcards/_search", {"client": {"email": "nobody"}}))[1] == []


async def test_search_by_code_of_a_restricted_card_needs_its_owner(service):
    card = await create_card(service, profileId="owner-7", restrictedToOwner=True)
    await transact(service, "/native", card["id"], "Credit", 10, "load")
    cart = {"redemptionCode": card["redemptionCode"]}
    stranger = await service.call("POST", "/native/giftcards/_search", {"client": {"id": "other"}, "cart": cart})
    owner = await service.call("POST", "/native/giftcards/_search", {"client": {"id": "owner-7"}, "cart": cart})
    assert stranger[1] == [] and [c["id"] for c in owner[1]] == [card["id"]]


@pytest.mark.parametrize("header", ["resources=1-2", "1-2"])
async def test_search_honours_rest_range_in_both_forms(service, header):
    ids = []
    for _ in range(4):
        card = await create_card(service, profileId="many@example.com")
        await transact(service, "/native", card["id"], "Credit", 1, "load")
        ids.append(card["id"])
    search = {"client": {"email": "many@example.com"}}
    everything = (await service.call("POST", "/native/giftcards/_search", search))[1]
    status, page, headers = await service.call(
        "POST", "/native/giftcards/_search", search, headers={"REST-Range": header}
    )
    assert status == 200 and [c["id"] for c in page] == [c["id"] for c in everything[1:3]]
    assert headers["REST-Content-Range"] == "resources 1-2/4"
    status, api_page, _ = await service.call("POST", "/api/giftcards/_search", search, headers={"REST-Range": header})
    assert [c["id"] for c in api_page["items"]] == [c["id"] for c in everything[1:3]]
    assert api_page["paging"] == {"page": 1, "perPage": 2, "total": 4, "pages": 2}
    status, error, _ = await service.call("POST", "/native/giftcards/_search", search, headers={"REST-Range": "x"})
    assert status == 400 and "REST-Range" in error["error"]["message"]


@pytest.mark.parametrize("base", ["/native", "/api"])
async def test_transaction_lists_are_paged_with_rest_range(service, base):
    card = await create_card(service, base)
    for n in range(3):
        assert (await transact(service, base, card["id"], "Credit", 1, f"load-{n}"))[0] == 200
    transactions = f"{base}/giftcards/{card['id']}/transactions"
    status, everything, headers = await service.call("GET", transactions)
    assert status == 200 and len(everything) == 3 and headers["REST-Content-Range"] == "resources 0-2/3"
    status, page, headers = await service.call("GET", transactions, headers={"REST-Range": "resources=1-2"})
    assert status == 200 and page == everything[1:3] and headers["REST-Content-Range"] == "resources 1-2/3"
    status, page, headers = await service.call("GET", transactions, headers={"REST-Range": "0-0"})
    assert page == everything[:1] and headers["REST-Content-Range"] == "resources 0-0/3"
    status, error, _ = await service.call("GET", transactions, headers={"REST-Range": "0-5000"})
    assert status == 400 and "REST-Range" in error["error"]["message"]


async def test_an_unranged_transaction_list_is_never_cut_to_a_first_page(service):
    """VTEX's specs page no transaction list, so its hub sends no REST-Range: it must get all of them."""
    card = await create_card(service, "/native")
    loads = PAGE_ITEMS_DEFAULT + 2
    for n in range(loads):
        assert (await transact(service, "/native", card["id"], "Credit", 1, f"load-{n}"))[0] == 200
    status, everything, headers = await service.call("GET", f"/native/giftcards/{card['id']}/transactions")
    assert status == 200 and len(everything) == loads
    assert headers["REST-Content-Range"] == f"resources 0-{loads - 1}/{loads}"


@pytest.mark.parametrize(
    ("path", "key_header", "token_header"),
    [
        ("/native/giftcards/00000000-0000-0000-0000-000000000000", "X-PROVIDER-API-AppKey", "X-PROVIDER-API-AppToken"),
        ("/api/giftcards/00000000-0000-0000-0000-000000000000", "X-VTEX-API-AppKey", "X-VTEX-API-AppToken"),
    ],
)
async def test_missing_credentials_401_and_wrong_ones_403_with_empty_bodies(service, path, key_header, token_header):
    async with aiohttp.ClientSession() as bare:
        async with bare.get(service.base_url + path) as response:
            assert response.status == 401 and await response.read() == b""
        async with bare.get(service.base_url + path, headers={key_header: "x"}) as response:
            assert response.status == 401
        wrong = {key_header: "provider-key", token_header: "wrong"}
        async with bare.get(service.base_url + path, headers=wrong) as response:
            assert response.status == 403 and await response.read() == b""
        swapped = (
            {key_header: "hub-key", token_header: "hub-token"}
            if "PROVIDER" in key_header
            else {key_header: "provider-key", token_header: "provider-token"}
        )
        async with bare.get(service.base_url + path, headers=swapped) as response:
            assert response.status == 403, "one audience's credentials must not open the other"


async def test_vnd_media_types_unknown_fields_and_headers_are_accepted(service):
    card = await create_card(service, extraField={"nested": True})
    status, body, headers = await service.call(
        "POST",
        f"/native/giftcards/{card['id']}/transactions",
        {
            "operation": "Credit",
            "value": 12.5,
            "description": "x",
            "requestId": "r",
            "redemptionToken": card["redemptionToken"],
            "redemptionCode": card["redemptionCode"],
            "orderInfo": {"orderId": "o1", "sequence": 5, "cart": {"items": [{"price": 5.92, "priceTags": []}]}},
            "somethingNew": 1,
        },
        headers={
            "Content-Type": "application/vnd.vtex.giftcards.v1+json",
            "x-vtex-operation-id": "4a0b5d2c-9c0e-4e55-9c51-000000000001",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "baggage": "a=b",
            "x-vtex-debug-id": "",
        },
    )
    assert status == 200, body
    assert headers["X-Request-Id"] == "4a0b5d2c-9c0e-4e55-9c51-000000000001"


async def test_unsupported_media_type_is_a_clear_415(service):
    card = await create_card(service)
    status, body, _ = await service.call(
        "POST",
        f"/native/giftcards/{card['id']}/transactions",
        data=b"operation=Credit",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        (b"{not json", 400, "invalid request body"),
        (b"", 400, "JSON object"),
        (b"[]", 400, "invalid request body"),
        (b'{"operation":"Credit","value":"ten","requestId":"r"}', 400, "value"),
        (b'{"operation":"Credit","requestId":"r"}', 400, "value"),
        (b'{"operation":"Credit","value":1}', 400, "requestId"),
        (b'{"operation":"Refund","value":1,"requestId":"r"}', 400, "operation"),
        (b'{"operation":"Credit","value":0,"requestId":"r"}', 400, "greater than zero"),
        (b'{"operation":"Credit","value":-5,"requestId":"r"}', 400, "greater than zero"),
        (b'{"operation":"Credit","value":"NaN","requestId":"r"}', 400, "finite"),
        (b'{"operation":"Credit","value":1e300,"requestId":"r"}', 400, "too large"),
        (b'{"operation":"Credit","value":1.001,"requestId":"r"}', 400, "decimals"),
        (b'{"operation":"Credit","value":1,"requestId":""}', 400, "requestId"),
        (b'{"operation":"Credit","value":1,"requestId":"r","description":"a\\u0000b"}', 400, "NUL"),
        (b'{"operation":"Debit","value":5,"requestId":"r"}', 422, "available"),
    ],
)
async def test_bad_transactions_get_a_clear_4xx_and_write_nothing(service, pool, payload, status, needle):
    card = await create_card(service)
    before = await count_events(pool)
    got, body, _ = await service.call("POST", f"/native/giftcards/{card['id']}/transactions", data=payload)
    assert got == status, body
    assert needle in body["error"]["message"]
    assert await count_events(pool) == before


async def test_refusals_on_settlement_and_cancellation(service, pool):
    card = await create_card(service)
    await transact(service, "/native", card["id"], "Credit", 10, "load")
    _, debit, _ = await transact(service, "/native", card["id"], "Debit", 4, "d")
    tx = f"/native/giftcards/{card['id']}/transactions/{debit['id']}"
    before = await count_events(pool)
    cases = [
        ("POST", f"{tx}/settlements", {"value": 4.01, "requestId": "s"}, 422, "over_settlement"),
        ("POST", f"{tx}/cancellations", {"value": 5, "requestId": "c"}, 422, "over_cancellation"),
        ("POST", f"{tx}/settlements", {"value": 1}, 400, "invalid_request"),
        ("GET", f"/native/giftcards/{card['id']}/transactions/nope", None, 404, "transaction_not_found"),
        ("GET", "/native/giftcards/not-a-card", None, 404, "card_not_found"),
        ("GET", "/native/giftcards/00000000-0000-0000-0000-000000000000/transactions", None, 404, "card_not_found"),
        ("PATCH", f"/native/giftcards/{card['id']}", {}, 405, "method_not_allowed"),
        ("GET", "/native/unknown/operation", None, 404, "unknown_operation"),
    ]
    for method, path, body, status, code in cases:
        got, answer, _ = await service.call(method, path, body)
        assert (got, answer["error"]["code"]) == (status, code), (method, path, answer)
    assert await count_events(pool) == before


async def test_request_id_reused_with_a_different_payload_is_409(service):
    card = await create_card(service)
    assert (await transact(service, "/native", card["id"], "Credit", 10, "same"))[0] == 200
    status, body, _ = await transact(service, "/native", card["id"], "Credit", 11, "same")
    assert status == 409 and body["error"]["code"] == "request_id_reused"


async def test_expired_card_refuses_debits(service, clock):
    card = await create_card(service, expiringDate=(clock.now + timedelta(hours=1)).isoformat())
    await transact(service, "/native", card["id"], "Credit", 10, "load")
    clock.advance(timedelta(hours=2))
    status, body, _ = await transact(service, "/native", card["id"], "Debit", 1, "late")
    assert status == 422 and body["error"]["code"] == "card_expired"


async def test_bad_card_creation_is_refused(service, pool):
    cases = [
        ({"caption": "c", "profileId": "p"}, 400),
        ({"relationName": "r", "caption": "c", "profileId": "p", "currencyCode": "ZZZ"}, 400),
        ({"relationName": "r", "caption": "c", "profileId": "p", "expiringDate": "tomorrow"}, 400),
        ({"relationName": "r", "caption": "c", "profileId": "p", "expiringDate": "2000-01-01T00:00:00Z"}, 400),
        ({"relationName": "r", "caption": 5, "profileId": "p"}, 400),
    ]
    for body, status in cases:
        got, answer, _ = await service.call("POST", "/native/giftcards", body)
        assert got == status and answer["error"]["message"], (body, answer)
    status, answer, _ = await service.call(
        "POST", "/api/giftcards", {"relationName": "r", "caption": "c", "profileId": "p"}
    )
    assert status == 400 and "expiringDate" in answer["error"]["message"]
    await create_card(service, relationName="dup")
    status, answer, _ = await service.call(
        "POST", "/native/giftcards", {"relationName": "dup", "caption": "c", "profileId": "p"}
    )
    assert status == 409 and answer["error"]["code"] == "duplicate_relation_name"
    assert await count_events(pool) == 1


async def test_oversized_body_is_413(service):
    card = await create_card(service)
    huge = b'{"operation":"Credit","value":1,"requestId":"r","description":"' + b"x" * 200_000 + b'"}'
    status, body, _ = await service.call("POST", f"/native/giftcards/{card['id']}/transactions", data=huge)
    assert status == 413 and body["error"]["code"] == "body_too_large"


async def test_deeply_nested_order_info_is_refused(service):
    card = await create_card(service)
    nested = b'{"a":' * 40 + b"1" + b"}" * 40
    payload = b'{"operation":"Credit","value":1,"requestId":"r","orderInfo":' + nested + b"}"
    status, body, _ = await service.call("POST", f"/native/giftcards/{card['id']}/transactions", data=payload)
    assert status == 400 and "nested" in body["error"]["message"]


@pytest.mark.parametrize(
    "order_info",
    [
        b'{"cart":{"items":[{"name":"shoe\\u0000s"}]}}',  # deep in a value
        b'{"clientProfile":{"first\\u0000Name":"Ana"}}',  # in a key
    ],
    ids=["value", "key"],
)
async def test_nul_anywhere_in_order_info_is_a_400_that_writes_nothing(service, pool, order_info):
    """Only the escape \\u0000 decodes to NUL (a raw NUL byte is not JSON): a body holding it
    anywhere is walked, and refused before it reaches the jsonb column."""
    card = await create_card(service)
    before = await count_events(pool)
    payload = b'{"operation":"Credit","value":1,"requestId":"r","orderInfo":' + order_info + b"}"
    status, body, _ = await service.call("POST", f"/native/giftcards/{card['id']}/transactions", data=payload)
    assert status == 400 and "NUL" in body["error"]["message"], body
    assert await count_events(pool) == before


async def test_an_escaped_backslash_before_u0000_is_text_not_nul(service):
    """``\\\\u0000`` in JSON is a backslash and the letters u0000: stored as sent, not refused."""
    card = await create_card(service)
    payload = b'{"operation":"Credit","value":1,"requestId":"r","description":"a\\\\u0000b"}'
    status, body, _ = await service.call("POST", f"/native/giftcards/{card['id']}/transactions", data=payload)
    assert status == 200, body
    _, got, _ = await service.call("GET", f"/native/giftcards/{card['id']}/transactions/{body['id']}")
    assert got["description"] == "a\\u0000b"


NESTING_REFUSED = 1100  # deeper than Python's recursion limit: once a RecursionError and a 500


@pytest.mark.parametrize(
    "deep",
    [
        b"[" * NESTING_REFUSED + b"]" * NESTING_REFUSED,
        b'{"a":' * NESTING_REFUSED + b"1" + b"}" * NESTING_REFUSED,
        b"[" * NESTING_REFUSED,  # never closed
    ],
    ids=["lists", "objects", "unclosed"],
)
async def test_json_nested_past_the_limit_is_a_400_that_writes_nothing(service, pool, deep):
    from hub.wire import JSON_DEPTH_MAX

    card = await create_card(service)
    before = await count_events(pool)
    transaction = b'{"operation":"Credit","value":1,"requestId":"r","unknownField":'
    for method, path, body in [
        ("POST", f"/native/giftcards/{card['id']}/transactions", transaction + deep + b"}"),
        ("POST", "/api/giftcards/_search", b'{"client":{"email":"x@example.com"},"cart":' + deep + b"}"),
        ("POST", "/api/giftcardproviders/VtexGiftCard/giftcards", deep),
        ("PUT", "/api/giftcardproviders/Deep", b'{"serviceUrl":"https://example.com/v1","caption":' + deep + b"}"),
    ]:
        status, answer, _ = await service.call(method, path, data=body)
        assert status == 400, (path, answer)
        assert answer["error"]["message"] == f"JSON nested deeper than {JSON_DEPTH_MAX} levels", (path, answer)
    assert await count_events(pool) == before


async def test_json_nested_to_the_limit_is_accepted_and_one_deeper_refused(service):
    from hub.wire import JSON_DEPTH_MAX

    card = await create_card(service)

    def credit(depth: int, request_id: str) -> bytes:
        inner = depth - 1  # the transaction's own object is the first level
        nested = b"[" * inner + b'"[{ in a string do not count"' + b"]" * inner
        return b'{"operation":"Credit","value":1,"requestId":"' + request_id.encode() + b'","extra":' + nested + b"}"

    path = f"/native/giftcards/{card['id']}/transactions"
    status, answer, _ = await service.call("POST", path, data=credit(JSON_DEPTH_MAX, "at-limit"))
    assert status == 200, answer
    status, answer, _ = await service.call("POST", path, data=credit(JSON_DEPTH_MAX + 1, "past-limit"))
    assert status == 400 and "nested deeper" in answer["error"]["message"]


async def test_200_concurrent_debits_over_http_exactly_100_succeed(service):
    card = await create_card(service)
    await transact(service, "/native", card["id"], "Credit", 100, "load")
    results = await asyncio.gather(*(transact(service, "/native", card["id"], "Debit", 1, f"d{i}") for i in range(200)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 100 and statuses.count(422) == 100
    assert (await service.call("GET", f"/native/giftcards/{card['id']}"))[1]["balance"] == 0


async def test_health_and_readiness(service):
    async with aiohttp.ClientSession() as bare:
        async with bare.get(service.base_url + "/healthz") as response:
            assert response.status == 200
        async with bare.get(service.base_url + "/readyz") as response:
            assert response.status == 200 and (await response.json())["status"] == "ready"


async def test_first_start_without_credentials_generates_a_pair_shown_once(database_url, pool):
    from aiohttp import web

    from hub.app import create_app
    from hub.config import Settings

    shown: list[tuple[str, tuple[str, str]]] = []
    app = create_app(Settings(), database_url, announce=lambda audience, pair: shown.append((audience, pair)))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        assert sorted(a for a, _ in shown) == ["hub", "provider"]
        hub_key, hub_token = dict(shown)["hub"]
        stored = await pool.fetch("select app_key, token_hash::text as h from api_keys")
        assert hub_token not in str([tuple(r) for r in stored])
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/api/giftcards/00000000-0000-0000-0000-000000000000"
            async with session.get(url) as response:
                assert response.status == 401
            headers = {"X-VTEX-API-AppKey": hub_key, "X-VTEX-API-AppToken": hub_token}
            async with session.get(url, headers=headers) as response:
                assert response.status == 404
    finally:
        await runner.cleanup()
    again = create_app(Settings(), database_url, announce=lambda audience, pair: shown.append((audience, pair)))
    runner = web.AppRunner(again)
    await runner.setup()
    await runner.cleanup()
    assert len(shown) == 2, "a pair is generated and shown on the first start only"
