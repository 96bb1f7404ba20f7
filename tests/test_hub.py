"""The Gift Card Hub over real loopback HTTP: the registry, routing to the native ledger and
to external providers (a reference one and a faulty one, both real aiohttp servers)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import yarl

from tests.cards import count_events
from tests.conftest import TEST_SECRET_KEY
from tests.providers.faulty import Fault, start_faulty_provider
from tests.providers.reference import start_reference_provider

HUB = "/api/giftcardproviders"


async def register(service, provider_id: str, provider, **overrides):
    body = {
        "id": provider_id,
        "serviceUrl": provider.service_url,
        "oauthProvider": "vtex",
        "preAuthEnabled": True,
        "cancelEnabled": True,
        "appKey": provider.app_key,
        "appToken": provider.app_token,
        **overrides,
    }
    return await service.call("PUT", f"{HUB}/{provider_id}", body)


# ---- registry ----------------------------------------------------------------------------


async def test_native_provider_is_always_listed_and_cannot_be_deleted(service):
    status, providers, headers = await service.call("GET", HUB)
    assert status == 200 and [p["id"] for p in providers] == ["VtexGiftCard"]
    assert providers[0]["_self"]["href"] == f"{HUB}/VtexGiftCard"
    status, body, _ = await service.call("DELETE", f"{HUB}/VtexGiftCard")
    assert status == 409 and body["error"]["code"] == "native_provider_is_built_in"


async def test_register_get_list_and_delete_an_external_provider(service, pool):
    async with start_reference_provider() as provider:
        status, body, _ = await register(service, "Acme", provider, caption="Acme cards")
        assert status == 200
        assert body == {
            "id": "Acme",
            "serviceUrl": provider.service_url,
            "oauthProvider": "vtex",
            "caption": "Acme cards",
            "preAuthEnabled": True,
            "cancelEnabled": True,
            "_self": {"href": f"{HUB}/Acme"},
        }
        assert (await service.call("GET", f"{HUB}/Acme"))[1] == body
        ids = [p["id"] for p in (await service.call("GET", HUB, headers={"REST-Range": "resources=0-9"}))[1]]
        assert ids == ["VtexGiftCard", "Acme"]
        page = (await service.call("GET", HUB, headers={"REST-Range": "1-1"}))[1]
        assert [p["id"] for p in page] == ["Acme"]
        assert (await service.call("DELETE", f"{HUB}/Acme"))[0] == 200
        status, error, _ = await service.call("GET", f"{HUB}/Acme")
        assert status == 404 and error["error"]["code"] == "provider_not_found"
        assert (await service.call("DELETE", f"{HUB}/Acme"))[0] == 404
    events = await pool.fetch("select type, metadata from events where stream_id = 'provider-Acme' order by version")
    assert [e["type"] for e in events] == ["ProviderRegistered", "ProviderRemoved"]
    assert all('"actor": "hub-key"' in e["metadata"] for e in events), "who changed it is recorded"


async def test_a_provider_registered_without_a_caption_answers_no_null_caption(service):
    """VTEX types the caption as a string and leaves it out of its examples: never ``null``."""
    async with start_reference_provider() as provider:
        status, put, _ = await register(service, "Acme", provider)
        assert status == 200
        got = (await service.call("GET", f"{HUB}/Acme"))[1]
        listed = [p for p in (await service.call("GET", HUB))[1] if p["id"] == "Acme"]
        for answer in (put, got, *listed):
            assert "caption" not in answer, answer
        assert got == put


async def test_credentials_are_encrypted_at_rest_and_never_shown(service, pool):
    async with start_reference_provider(app_key="acme-key-123", app_token="acme-token-456") as provider:
        status, body, _ = await register(service, "Acme", provider)
        assert status == 200 and "appKey" not in body and "appToken" not in body
        listing = str((await service.call("GET", HUB))[1])
        dump = await pool.fetchval(
            "select string_agg(t::text, ' ') from (select data, metadata from events union all "
            "select to_jsonb(p), '{}'::jsonb from providers p) t"
        )
        for secret in ("acme-key-123", "acme-token-456"):
            assert secret not in listing and secret not in dump


async def test_credentials_are_refused_without_a_secret_key(start_service, pool):
    from ledger.postgres.credentials_cipher import CredentialsCipher

    service = await start_service()
    service.app  # noqa: B018 (the started app; replace its cipher with one that has no key)
    from hub.http.state import REGISTRY

    service.app[REGISTRY].cipher = CredentialsCipher(None)
    async with start_reference_provider() as provider:
        status, body, _ = await register(service, "Acme", provider)
    assert status == 400 and "GIFTCARD_SECRET_KEY" in body["error"]["message"]
    assert await pool.fetchval("select count(*) from events") == 0


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/x", "http(s)"),
        ("/relative/path", "absolute"),
        ("https://example.com", "path segment"),
        ("https://example.com/", "slash"),
        ("https://example.com/v1/", "slash"),
        ("https://example.com/v1?x=1", "query"),
        ("https://user:pw@example.com/v1", "credentials"),
        ("https://example.com//v1", "empty path segment"),
    ],
)
async def test_service_url_is_validated(service, url, why, pool):
    status, body, _ = await service.call("PUT", f"{HUB}/Acme", {"serviceUrl": url, "appKey": "k", "appToken": "t"})
    assert status == 400 and why in body["error"]["message"]
    assert await pool.fetchval("select count(*) from providers") == 0


async def test_put_refuses_mismatched_id_missing_credentials_and_the_native_id(service):
    base = {"serviceUrl": "https://example.com/v1", "appKey": "k", "appToken": "t"}
    status, body, _ = await service.call("PUT", f"{HUB}/Acme", {**base, "id": "Other"})
    assert status == 400 and "must equal" in body["error"]["message"]
    status, body, _ = await service.call("PUT", f"{HUB}/Acme", {"serviceUrl": "https://example.com/v1"})
    assert status == 400 and "appKey" in body["error"]["message"]
    status, body, _ = await service.call("PUT", f"{HUB}/VtexGiftCard", base)
    assert status == 409
    status, body, _ = await service.call("PUT", f"{HUB}/bad%20id", base)
    assert status == 400


async def test_a_change_through_one_process_is_seen_by_another_within_a_second(start_service):
    first = await start_service()
    second = await start_service()
    async with start_reference_provider() as provider:
        card = provider.state.issue_card(balance="50.00")
        assert (await register(first, "Acme", provider))[0] == 200
        deadline = time.monotonic() + 1.0
        while True:
            status, body, _ = await second.call("GET", f"{HUB}/Acme/giftcards/{card.id}")
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert status == 200 and body["balance"] == 50


async def test_unknown_provider_is_a_404_with_a_json_error(service):
    for method, path in [("GET", f"{HUB}/Nobody"), ("GET", f"{HUB}/Nobody/giftcards/1"), ("DELETE", f"{HUB}/Nobody")]:
        status, body, _ = await service.call(method, path)
        assert status == 404 and body["error"]["code"] == "provider_not_found", (method, path)


# ---- routing to the native provider ---------------------------------------------------------


def card_body(**overrides) -> dict:
    """A create-card body with every field a typed VTEX client sends."""
    return {
        "relationName": f"hub-{uuid.uuid4().hex[:10]}",
        "emissionDate": "2026-01-01T00:00:00Z",
        "expiringDate": "2027-01-01T00:00:00Z",
        "caption": "Gift",
        "restrictedToOwner": False,
        "multipleRedemptions": True,
        "multipleCredits": True,
        "profileId": "ana@example.com",
        "currencyCode": "USD",
        **overrides,
    }


# On Citus too: the rest of this file is the registry and the external providers, not the ledger.
@pytest.mark.also_on_citus
async def test_checkout_through_the_hub_on_the_native_provider(service, pool):
    base = f"{HUB}/VtexGiftCard/giftcards"
    status, card, _ = await service.call("POST", base, card_body(relationName="hub-native-1"))
    assert status == 200 and card["provider"] == "VtexGiftCard"
    assert card["transactions"]["href"] == f"{base}/{card['id']}/transactions"
    code = card["redemptionCode"]
    await service.call(
        "POST", f"{base}/{card['id']}/transactions", {"operation": "Credit", "value": 100, "requestId": "load"}
    )
    found = (await service.call("POST", f"{base}/_search", {"client": {"id": "x"}, "cart": {"redemptionCode": code}}))[
        1
    ]
    assert [f["id"] for f in found] == [card["id"]]
    assert found[0]["provider"] == "VtexGiftCard" and found[0]["_self"]["href"] == f"{base}/{card['id']}"
    got = (await service.call("GET", f"{base}/{card['id']}"))[1]
    assert got["balance"] == 100 and got["provider"] == "VtexGiftCard" and "*" in got["redemptionCode"]

    _, debit, _ = await service.call(
        "POST", f"{base}/{card['id']}/transactions", {"operation": "Debit", "value": 80, "requestId": "order"}
    )
    tx = f"{base}/{card['id']}/transactions/{debit['id']}"
    assert debit["_self"]["href"] == tx
    status, settled, _ = await service.call("POST", f"{tx}/settlements", {"value": 50, "requestId": "s1"})
    assert status == 200 and total(settled) == 50
    # the gateway asks again for the same total: nothing more is settled
    _, settled, _ = await service.call("POST", f"{tx}/settlements", {"value": 50, "requestId": "s2"})
    assert total(settled) == 50 and len(settled) == 1
    # then for a larger total: only the remainder is posted
    _, settled, _ = await service.call("POST", f"{tx}/settlements", {"value": 60, "requestId": "s3"})
    assert total(settled) == 60 and settled[-1]["value"] == 10
    _, cancelled, _ = await service.call("POST", f"{tx}/cancellations", {"value": 30, "requestId": "c1"})
    assert cancelled["value"] == 30
    _, again, _ = await service.call("POST", f"{tx}/cancellations", {"value": 30, "requestId": "c2"})
    assert again["oid"] == cancelled["oid"], "an already complete cancellation posts nothing"
    assert (await service.call("GET", f"{base}/{card['id']}"))[1]["balance"] == 50
    detail = (await service.call("GET", tx))[1]
    assert detail["settlement"]["href"] == f"{tx}/settlements"
    listed = (await service.call("GET", f"{base}/{card['id']}/transactions"))[1]
    assert {t["_self"]["href"] for t in listed} == {f"{base}/{card['id']}/transactions/{t['id']}" for t in listed}


def total(operations) -> float:
    return sum(op["value"] for op in operations)


async def test_the_hub_passes_the_code_and_token_it_was_sent_to_the_native_provider(service, pool):
    base = f"{HUB}/VtexGiftCard/giftcards"
    holder = "hub-token@example.com"
    card = (await service.call("POST", base, card_body(relationName="hub-token-1", profileId=holder)))[1]
    other = (await service.call("POST", base, card_body(relationName="hub-token-2")))[1]
    transactions = f"{base}/{card['id']}/transactions"
    load = {"operation": "Credit", "value": 100, "requestId": "load", "redemptionCode": card["redemptionCode"]}
    assert (await service.call("POST", transactions, load))[0] == 200
    found = (await service.call("POST", f"{base}/_search", {"client": {"id": holder}, "cart": {}}))[1]
    token = (await service.call("GET", f"{base}/{card['id']}"))[1]["redemptionToken"]
    assert [f["redemptionToken"] for f in found] == [token] and token == card["redemptionToken"]
    events = await count_events(pool)
    for wrong in ({"redemptionCode": other["redemptionCode"]}, {"redemptionToken": other["redemptionToken"]}):
        status, body, _ = await service.call(
            "POST", transactions, {"operation": "Debit", "value": 10, "requestId": "order", **wrong}
        )
        assert status == 400 and body["error"]["code"] in ("redemption_code_mismatch", "redemption_token_mismatch")
    assert await count_events(pool) == events
    debit = {"operation": "Debit", "value": 10, "requestId": "order", "redemptionToken": token, "redemptionCode": ""}
    assert (await service.call("POST", transactions, debit))[0] == 200


# ---- routing to an external provider ---------------------------------------------------------


async def test_checkout_through_the_hub_on_an_external_provider(service, pool):
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider)
        voucher = provider.state.issue_card(balance="75.00")
        base = f"{HUB}/Acme/giftcards"
        found = (
            await service.call(
                "POST", f"{base}/_search", {"client": {"id": "c"}, "cart": {"redemptionCode": voucher.redemption_code}}
            )
        )[1]
        assert [(f["id"], f["provider"], f["balance"]) for f in found] == [(voucher.id, "Acme", 75)]
        assert found[0]["_self"]["href"] == f"{base}/{voucher.id}"

        got = (await service.call("GET", f"{base}/{voucher.id}?ts=1"))[1]
        assert got["provider"] == "Acme" and got["transactions"]["href"] == f"{base}/{voucher.id}/transactions"

        status, debit, _ = await service.call(
            "POST",
            f"{base}/{voucher.id}/transactions",
            {
                "operation": "Debit",
                "value": 40.5,
                "description": "order",
                "requestId": "order-9",
                "redemptionCode": voucher.redemption_code,
                "redemptionToken": voucher.redemption_token,
            },
        )
        assert status == 200, debit
        tx = f"{base}/{voucher.id}/transactions/{debit['id']}"
        assert debit["_self"]["href"] == tx
        _, settled, _ = await service.call("POST", f"{tx}/settlements", {"value": 40.5, "requestId": "s"})
        assert total(settled) == 40.5
        _, settled, _ = await service.call("POST", f"{tx}/settlements", {"value": 40.5, "requestId": "s"})
        assert len(settled) == 1
        assert (
            provider.state.transaction(voucher.id, debit["id"]).settled
            == provider.state.transaction(voucher.id, debit["id"]).value
        )

        forwarded = provider.state.requests_for("CreateGiftCardTransactionSettlement")
        assert len(forwarded) == 1, "the hub posted the settlement once, after listing"
        sent = forwarded[0]
        assert sent.headers["X-PROVIDER-API-AppKey"] == provider.app_key
        assert sent.headers["Content-Type"] == "application/vnd.vtex.giftcards.v1+json"
        assert sent.headers["X-Request-Id"]

    recorded = await pool.fetch("select data from events where type = 'ProviderCallForwarded' order by position")
    operations = [r["data"] for r in recorded]
    assert any('"CreateGiftCardTransaction"' in d and '"40.5"' in d and '"ok"' in d for d in operations)
    assert all("latencyMs" in d and '"providerId": "Acme"' in d for d in operations)


async def test_provider_refusals_pass_through_with_the_provider_named(service):
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider)
        card = provider.state.issue_card(balance="5.00")
        status, body, _ = await service.call(
            "POST",
            f"{HUB}/Acme/giftcards/{card.id}/transactions",
            {"operation": "Debit", "value": 50, "requestId": "too-much", "redemptionCode": card.redemption_code},
        )
        assert 400 <= status < 500 and body["error"]["code"] == "provider_refused"
        assert "Acme" in body["error"]["message"]


async def test_wrong_provider_credentials_are_a_502_that_leaks_nothing(service):
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider, appToken="not-the-token")
        card = provider.state.issue_card(balance="5.00")
        status, body, _ = await service.call("GET", f"{HUB}/Acme/giftcards/{card.id}")
        assert status == 502 and body["error"]["code"] == "provider_rejected_credentials"
        assert "not-the-token" not in str(body)


async def test_bad_input_is_refused_before_anything_is_forwarded(service):
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider)
        card = provider.state.issue_card(balance="5.00")
        before = len(provider.state.requests)
        for path, body in [
            (f"{HUB}/Acme/giftcards/{card.id}/transactions", {"operation": "Debit", "requestId": "x"}),
            (f"{HUB}/Acme/giftcards/{card.id}/transactions/t/settlements", {"value": -1, "requestId": "x"}),
            (f"{HUB}/Acme/giftcards/{card.id}/transactions/t/cancellations", {"value": "NaN", "requestId": "x"}),
            (f"{HUB}/Acme/giftcards", {"caption": "no relation name"}),
        ]:
            status, answer, _ = await service.call("POST", path, body)
            assert status == 400 and answer["error"]["message"], (path, answer)
        assert len(provider.state.requests) == before


async def call_unnormalised(service, method: str, path: str, body=None):
    """A request whose path reaches the hub exactly as written (``%2E%2E`` is not folded to ``..``)."""
    url = yarl.URL(service.base_url + path, encoded=True)
    async with service.session.request(method, url, json=body, headers=service.headers(path)) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("method", "tail"),
    [
        ("GET", "%2E%2E/transactions/%2E%2E/settlements"),
        ("POST", "%2E%2E/transactions/%2E%2E/settlements"),
        ("POST", "{card}/transactions/%2e/cancellations"),
        ("GET", "%2E"),
        ("GET", "..%2F..%2Fx"),
        ("GET", "{card}/transactions/..%2F..%2Fx/authorization"),
        ("POST", "..%2Fx/transactions"),
    ],
)
async def test_dot_segment_and_slashed_ids_are_refused_before_anything_is_forwarded(service, method, tail):
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider)
        card = provider.state.issue_card(balance="5.00")
        body = {"value": 1, "requestId": "r"} if method == "POST" else None
        if tail.endswith("/transactions"):
            body = {"operation": "Credit", "value": 1, "requestId": "r", "redemptionCode": card.redemption_code}
        path = f"{HUB}/Acme/giftcards/{tail.format(card=card.id)}"
        status, answer = await call_unnormalised(service, method, path, body)
        assert status == 400 and answer["error"]["code"] == "invalid_request", answer
        assert "'.'" in answer["error"]["message"] and "'/'" in answer["error"]["message"]
        assert provider.state.requests == [], "nothing reached the provider, not even a listing"


async def test_transaction_lists_through_the_hub_are_paged_with_rest_range(service):
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider)
        external = provider.state.issue_card(balance="0")
        _, native, _ = await service.call("POST", f"{HUB}/VtexGiftCard/giftcards", card_body())
        for pid, card_id, code in [
            ("Acme", external.id, external.redemption_code),
            ("VtexGiftCard", native["id"], native["redemptionCode"]),
        ]:
            transactions = f"{HUB}/{pid}/giftcards/{card_id}/transactions"
            for n in range(3):
                load = {"operation": "Credit", "value": 1, "requestId": f"load-{n}", "redemptionCode": code}
                assert (await service.call("POST", transactions, load))[0] == 200
            status, everything, headers = await service.call("GET", transactions)
            assert status == 200 and len(everything) == 3
            assert headers["REST-Content-Range"] == "resources 0-2/3", pid
            status, page, headers = await service.call("GET", transactions, headers={"REST-Range": "resources=1-2"})
            assert status == 200 and page == everything[1:3], pid
            assert headers["REST-Content-Range"] == "resources 1-2/3", pid
            status, page, headers = await service.call("GET", transactions, headers={"REST-Range": "2-9"})
            assert page == everything[2:] and headers["REST-Content-Range"] == "resources 2-2/3", pid
        before = len(provider.state.requests)
        status, error, _ = await service.call(
            "GET", f"{HUB}/Acme/giftcards/{external.id}/transactions", headers={"REST-Range": "9-1"}
        )
        assert status == 400 and "REST-Range" in error["error"]["message"]
        assert len(provider.state.requests) == before, "a bad range is refused before anything is forwarded"


async def test_cancel_enabled_false_refuses_cancellations(service):
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider, cancelEnabled=False)
        status, body, _ = await service.call(
            "POST", f"{HUB}/Acme/giftcards/c/transactions/t/cancellations", {"value": 1, "requestId": "r"}
        )
        assert status == 422 and body["error"]["code"] == "cancellations_disabled"


# ---- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault.HTTP_500, 502, "provider_error"),
        (Fault.MALFORMED_JSON, 502, "provider_bad_response"),
        (Fault.WRONG_SHAPE, 502, "provider_bad_response"),
        (Fault.DEEP_JSON, 502, "provider_bad_response"),
        (Fault.RESET, 502, "provider_unreachable"),
        (Fault.SLOW, 504, "provider_timeout"),
    ],
)
async def test_a_faulty_provider_gives_a_clear_error_within_budget(start_service, fault, status, code):
    service = await start_service(provider_get_card_timeout_s=0.5, provider_timeout_s=0.5)
    async with start_faulty_provider(slow_s=3.0) as provider:
        await register(service, "Flaky", provider)
        card = provider.state.issue_card(balance="5.00")
        provider.faults.set(fault)
        started = time.monotonic()
        got, body, _ = await service.call("GET", f"{HUB}/Flaky/giftcards/{card.id}")
        elapsed = time.monotonic() - started
    assert (got, body["error"]["code"]) == (status, code)
    assert "Flaky" in body["error"]["message"]
    assert elapsed < 1.5, f"answered after {elapsed:.2f} s, beyond the 0.5 s budget"


async def test_idempotent_calls_are_retried_and_recover(start_service):
    service = await start_service(provider_timeout_s=5.0, provider_get_card_timeout_s=5.0)
    async with start_faulty_provider() as provider:
        await register(service, "Flaky", provider)
        card = provider.state.issue_card(balance="5.00")
        provider.faults.set(Fault.HTTP_500, route="GetGiftCardbyID", times=2)
        status, body, _ = await service.call("GET", f"{HUB}/Flaky/giftcards/{card.id}")
        assert status == 200 and body["balance"] == 5
        assert len(provider.state.requests_for("GetGiftCardbyID")) == 3


async def test_card_creation_is_never_retried(start_service):
    service = await start_service(provider_timeout_s=5.0)
    async with start_faulty_provider() as provider:
        await register(service, "Flaky", provider)
        provider.faults.set(Fault.HTTP_500, route="CreateGiftCard", times=1)
        status, _, _ = await service.call(
            "POST", f"{HUB}/Flaky/giftcards", {"relationName": "r", "caption": "c", "profileId": "p"}
        )
        assert status == 502
        assert len(provider.state.requests_for("CreateGiftCard")) == 1


async def test_breaker_opens_on_a_dead_provider_and_recovers(start_service):
    service = await start_service(
        provider_timeout_s=0.3,
        provider_get_card_timeout_s=0.3,
        provider_retries_max=0,
        provider_breaker_failures_max=3,
        provider_breaker_open_s=0.5,
    )
    async with start_faulty_provider() as provider, start_reference_provider() as healthy:
        await register(service, "Flaky", provider)
        await register(service, "Steady", healthy)
        card = provider.state.issue_card(balance="5.00")
        good = healthy.state.issue_card(balance="7.00")
        provider.faults.set(Fault.HTTP_500)
        for _ in range(3):
            assert (await service.call("GET", f"{HUB}/Flaky/giftcards/{card.id}"))[0] == 502
        calls = len(provider.state.requests)
        status, body, headers = await service.call("GET", f"{HUB}/Flaky/giftcards/{card.id}")
        assert status == 503 and body["error"]["code"] == "provider_unavailable" and "Retry-After" in headers
        assert len(provider.state.requests) == calls, "an open breaker does not call the provider"
        assert (await service.call("GET", f"{HUB}/Steady/giftcards/{good.id}"))[0] == 200, "others unaffected"
        provider.faults.heal()
        await asyncio.sleep(0.6)
        status, body, _ = await service.call("GET", f"{HUB}/Flaky/giftcards/{card.id}")
        assert status == 200 and body["balance"] == 5


async def test_search_across_every_provider_reports_each_outcome(start_service):
    service = await start_service(provider_timeout_s=0.5)
    async with start_reference_provider() as good, start_faulty_provider(slow_s=3.0) as slow:
        await register(service, "Good", good)
        await register(service, "Slow", slow)
        good.state.issue_card(balance="10.00", profile_id="ana@example.com")
        slow.faults.set(Fault.SLOW)
        status, native_card, _ = await service.call(
            "POST",
            f"{HUB}/VtexGiftCard/giftcards",
            {"relationName": "x-1", "caption": "c", "profileId": "ana@example.com"},
        )
        await service.call(
            "POST",
            f"{HUB}/VtexGiftCard/giftcards/{native_card['id']}/transactions",
            {"operation": "Credit", "value": 3, "requestId": "load"},
        )
        started = time.monotonic()
        status, body, _ = await service.call(
            "POST", f"{HUB}/_search", {"client": {"id": "ana@example.com", "email": "ana@example.com"}, "cart": {}}
        )
        elapsed = time.monotonic() - started
    assert status == 200
    assert sorted(i["provider"] for i in body["items"]) == ["Good", "VtexGiftCard"]
    outcome = {p["id"]: p["status"] for p in body["providers"]}
    assert outcome == {"VtexGiftCard": "ok", "Good": "ok", "Slow": "timeout"}
    assert elapsed < 2.0, "providers are searched concurrently, within the budget"


def test_secret_key_used_by_tests_is_not_a_real_default():
    from hub.config import Settings

    assert TEST_SECRET_KEY not in str(Settings())


# ---- egress: no SSRF through serviceUrl ---------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/v1",
        "http://localhost:9/v1",
        "http://10.1.2.3/v1",
        "http://169.254.169.254/latest",
        "http://[::1]:9/v1",
        "http://[::ffff:127.0.0.1]/v1",
        "http://0.0.0.0/v1",
        "http://[2002:a9fe:a9fe::1]/v1",  # 169.254.169.254 (cloud metadata) inside 6to4
        "http://[2002:7f00:1::1]/v1",  # 127.0.0.1 inside 6to4
    ],
)
async def test_service_url_cannot_point_at_internal_addresses_without_an_allowlist(start_service, pool, url):
    service = await start_service(provider_allowlist=())
    status, body, _ = await service.call("PUT", f"{HUB}/Evil", {"serviceUrl": url, "appKey": "k", "appToken": "t"})
    assert status == 400 and body["error"]["code"] == "service_url_not_allowed", body
    assert await pool.fetchval("select count(*) from providers") == 0


async def test_a_6to4_address_wrapping_a_public_one_is_allowed(start_service):
    service = await start_service(provider_allowlist=())
    status, body, _ = await service.call(
        "PUT", f"{HUB}/Public", {"serviceUrl": "http://[2002:808:808::1]/v1", "appKey": "k", "appToken": "t"}
    )
    assert status == 200, body


async def test_the_allowlist_admits_named_networks_only(start_service):
    service = await start_service(provider_allowlist=("127.0.0.0/8",))
    ok = await service.call(
        "PUT", f"{HUB}/Local", {"serviceUrl": "http://127.0.0.1:9/v1", "appKey": "k", "appToken": "t"}
    )
    refused = await service.call(
        "PUT", f"{HUB}/Lan", {"serviceUrl": "http://10.0.0.1/v1", "appKey": "k", "appToken": "t"}
    )
    assert ok[0] == 200 and refused[0] == 400


async def test_a_provider_already_registered_is_not_called_once_the_allowlist_no_longer_admits_it(
    start_service, database_url
):
    permissive = await start_service(provider_allowlist=("127.0.0.0/8",))
    async with start_reference_provider() as provider:
        await register(permissive, "Acme", provider)
        card = provider.state.issue_card(balance="5.00")
        strict = await start_service(provider_allowlist=())
        before = len(provider.state.requests)
        status, body, _ = await strict.call("GET", f"{HUB}/Acme/giftcards/{card.id}")
        assert status == 502 and body["error"]["code"] == "provider_unreachable"
        assert len(provider.state.requests) == before
        named = await start_service(provider_allowlist=())
        named_host = provider.service_url.replace("127.0.0.1", "localhost")
        await register(permissive, "Named", provider, serviceUrl=named_host)
        status, body, _ = await named.call("GET", f"{HUB}/Named/giftcards/{card.id}")
        assert status == 502, "a name resolving to loopback is refused at connection time too"
        assert len(provider.state.requests) == before
