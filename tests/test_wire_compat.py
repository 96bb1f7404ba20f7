"""Wire compatibility with typed VTEX clients (issue 14), over real loopback HTTP.

Each point holds on the hub (``/api/giftcardproviders/...``) and, where the same answer exists,
on the native Gift Card API (``/api/giftcards/...``) and the Provider Protocol (``/native/...``).
"""

from __future__ import annotations

import json

import pytest

from hub.http.openapi import build_document
from tests.openapi import require_spec, requires_spec, validate_response
from tests.providers.reference import start_reference_provider
from tests.test_contract_native import order_info
from tests.test_hub import card_body, register

HUB = "/api/giftcardproviders"
HUB_NATIVE = f"{HUB}/VtexGiftCard"
SURFACES = {"hub": HUB_NATIVE, "native-api": "/api", "protocol": "/native"}


async def loaded_card(service, base: str, value: float = 100) -> str:
    status, card, _ = await service.call("POST", f"{base}/giftcards", card_body())
    assert status == 200, card
    status, _, _ = await service.call(
        "POST", f"{base}/giftcards/{card['id']}/transactions", {"operation": "Credit", "value": value, "requestId": "l"}
    )
    assert status == 200
    return card["id"]


async def event_count(pool) -> int:
    return await pool.fetchval("select count(*) from events where type like 'giftcard.%'")


# ---- 5. amounts as the caller sent them, with the currency --------------------------------


async def test_refusals_name_major_units_and_the_currency_on_every_surface(service, pool):
    for surface, base in SURFACES.items():
        card_id = await loaded_card(service, base, 20)
        before = await event_count(pool)
        status, body, _ = await service.call(
            "POST", f"{base}/giftcards/{card_id}/transactions", {"operation": "Debit", "value": 1000, "requestId": "d"}
        )
        message = body["error"]["message"]
        assert status == 422 and body["error"]["code"] == "insufficient_funds", (surface, body)
        assert "20.00 USD available, 1000.00 USD requested" in message and "minor" not in message, (surface, message)
        assert await event_count(pool) == before, f"{surface}: a refusal wrote nothing"


async def test_an_over_settlement_through_the_hub_names_the_callers_total(service, pool):
    card_id = await loaded_card(service, HUB_NATIVE, 100)
    transactions = f"{HUB_NATIVE}/giftcards/{card_id}/transactions"
    _, debit, _ = await service.call("POST", transactions, {"operation": "Debit", "value": 80, "requestId": "o"})
    tx = f"{transactions}/{debit['id']}"
    assert (await service.call("POST", f"{tx}/settlements", {"value": 50, "requestId": "s1"}))[0] == 200
    before = await event_count(pool)

    status, body, _ = await service.call("POST", f"{tx}/settlements", {"value": 100, "requestId": "s2"})
    assert status == 422 and body["error"]["code"] == "over_settlement", body
    message = body["error"]["message"]
    assert "cannot settle 100 USD in all" in message, message
    assert "50.00 USD settled already, 30.00 USD left to settle" in message, message
    assert "cannot settle 50" not in message, "the hub's remainder is not what the caller asked"

    status, body, _ = await service.call("POST", f"{tx}/cancellations", {"value": 10, "requestId": "c1"})
    assert status == 200
    status, body, _ = await service.call("POST", f"{tx}/cancellations", {"value": 90.5, "requestId": "c2"})
    message = body["error"]["message"]
    assert status == 422 and body["error"]["code"] == "over_cancellation", body
    assert "cannot cancel 90.5 USD in all" in message and "10.00 USD cancelled already" in message, message
    assert "70.00 USD left to cancel" in message, message
    assert await event_count(pool) == before + 1, "only the accepted cancellation was written"


async def test_an_external_providers_refusal_is_restated_in_the_callers_total(service):
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider)
        voucher = provider.state.issue_card(balance="75.00")
        transactions = f"{HUB}/Acme/giftcards/{voucher.id}/transactions"
        _, debit, _ = await service.call(
            "POST",
            transactions,
            {"operation": "Debit", "value": 40, "requestId": "o", "redemptionCode": voucher.redemption_code},
        )
        tx = f"{transactions}/{debit['id']}"
        assert (await service.call("POST", f"{tx}/settlements", {"value": 30, "requestId": "s1"}))[0] == 200
        status, body, _ = await service.call("POST", f"{tx}/settlements", {"value": 55.5, "requestId": "s2"})
        assert 400 <= status < 500 and body["error"]["code"] == "provider_refused", body
        message = body["error"]["message"]
        assert "Acme" in message and "cannot settle 55.5 USD in all" in message, message
        assert "30.0 USD settled already" in message and "remaining 25.5 USD" in message, message


# ---- 2. a transaction keeps the orderInfo its caller sent ------------------------------------


async def test_a_transaction_read_back_returns_the_order_info_sent_with_it(service):
    sent = order_info("ana@example.com")
    sent["cart"]["grandTotal"] = 172.820  # written as sent: an exact decimal, not a rounded float
    sent["paymentRelatedSellerInfo"] = {"seller": "1", "sellerOrderId": "SLR-1", "sellerSequence": "7", "value": 5.5}
    for surface, base in SURFACES.items():
        card_id = await loaded_card(service, base, 500)
        transactions = f"{base}/giftcards/{card_id}/transactions"
        debit = {"operation": "Debit", "value": 172.82, "requestId": "order", "orderInfo": sent}
        status, created, _ = await service.call("POST", transactions, debit)
        assert status == 200, (surface, created)
        status, detail, _ = await service.call("GET", f"{transactions}/{created['id']}")
        assert status == 200 and detail["orderInfo"] == sent, (surface, detail.get("orderInfo"))
        assert isinstance(detail["orderInfo"]["cart"]["items"][0]["priceTags"][0]["value"], float), surface
        assert detail["orderInfo"]["orderId"] == "1234567890123-01" and detail["orderInfo"]["sequence"] == 502301

        _, listed, _ = await service.call("GET", transactions)
        load = next(t["id"] for t in listed if t["id"] != created["id"])
        status, detail, _ = await service.call("GET", f"{transactions}/{load}")
        assert status == 200 and "orderInfo" not in detail, f"{surface}: none was sent with the Credit"


async def test_order_info_numbers_come_back_exactly_as_written(service):
    """The raw answer, not a float round trip: 14.990 stays 14.990 and text stays text."""
    card_id = await loaded_card(service, "/api", 500)
    transactions = f"/api/giftcards/{card_id}/transactions"
    raw = (
        b'{"operation":"Debit","value":14.99,"requestId":"exact","orderInfo":{"orderId":"00042","sequence":"501234",'
        b'"cart":{"grandTotal":14.990,"discounts":0,"shipping":1e1,"taxes":0,"itemsTotal":14.990,"items":[]}}}'
    )
    async with service.session.post(
        service.base_url + transactions, data=raw, headers=service.headers(transactions)
    ) as response:
        created = await response.json()
    async with service.session.get(
        f"{service.base_url}{transactions}/{created['id']}", headers=service.headers(transactions)
    ) as response:
        text = await response.text()
    assert '"grandTotal":14.990' in text and '"itemsTotal":14.990' in text, text
    assert '"orderId":"00042"' in text and '"sequence":"501234"' in text, text
    assert '"shipping":1E+1' in text, text


# ---- 1. a card created through the hub answers the whole card ----------------------------------


CARD_KEYS = {"id", "redemptionToken", "redemptionCode", "balance", "emissionDate", "expiringDate", "currencyCode"}


async def test_creating_a_card_answers_the_full_card_on_every_surface(service):
    native_api = (await service.call("POST", "/api/giftcards", card_body()))[1]
    for surface, base in SURFACES.items():
        status, card, _ = await service.call("POST", f"{base}/giftcards", card_body())
        assert status == 200, (surface, card)
        assert set(card) >= CARD_KEYS, (surface, CARD_KEYS - set(card))
        assert set(native_api) - {"_self"} <= set(card), (surface, set(native_api) - set(card))
        assert card["balance"] == 0 and "*" not in card["redemptionCode"], (surface, card)
        assert card["redemptionToken"], surface
    hub_card = (await service.call("POST", f"{HUB_NATIVE}/giftcards", card_body()))[1]
    assert hub_card["provider"] == "VtexGiftCard" and hub_card["discount"] is False
    got = (await service.call("GET", f"{HUB_NATIVE}/giftcards/{hub_card['id']}"))[1]
    assert "*" in got["redemptionCode"] and got["redemptionCode"] != hub_card["redemptionCode"], "shown once only"
    assert got["redemptionToken"] == hub_card["redemptionToken"], "the token is shown in full by every read"


async def test_a_card_created_at_an_external_provider_is_completed_from_its_card(service):
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider)
        status, card, _ = await service.call("POST", f"{HUB}/Acme/giftcards", card_body())
        assert status == 200, card
        assert set(card) >= CARD_KEYS, CARD_KEYS - set(card)
        assert card["balance"] == 0 and card["provider"] == "Acme"
        assert card["redemptionCode"] == provider.state.card(card["id"]).redemption_code, "the create's full code"
        assert len(provider.state.requests_for("CreateGiftCard")) == 1
        assert len(provider.state.requests_for("GetGiftCardbyID")) == 1


# ---- 3. transaction items through the hub name their provider -----------------------------------


async def test_hub_transaction_items_carry_the_provider(service):
    card_id = await loaded_card(service, HUB_NATIVE)
    transactions = f"{HUB_NATIVE}/giftcards/{card_id}/transactions"
    _, created, _ = await service.call("POST", transactions, {"operation": "Debit", "value": 1, "requestId": "x"})
    assert set(created) == {"provider", "cardId", "id", "_self"} and created["provider"] == "VtexGiftCard"
    _, listed, _ = await service.call("GET", transactions)
    assert len(listed) == 2
    for item in listed:
        assert set(item) == {"provider", "cardId", "id", "_self"}, item
        assert item["provider"] == "VtexGiftCard" and item["cardId"] == card_id


# ---- 4. the native provider's serviceUrl comes from configuration, never from Host -------------


async def native_service_urls(service, headers: dict[str, str]) -> set[str]:
    _, one, _ = await service.call("GET", HUB_NATIVE, headers=headers)
    _, listed, _ = await service.call("GET", HUB, headers=headers)
    return {one["serviceUrl"], next(p["serviceUrl"] for p in listed if p["id"] == "VtexGiftCard")}


SPOOFED = {"Host": "evil.example", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}


async def test_service_url_ignores_the_callers_host_header(service):
    port = service.base_url.rsplit(":", 1)[1]
    assert await native_service_urls(service, SPOOFED) == {f"http://127.0.0.1:{port}/native"}


async def test_service_url_is_the_configured_public_url(start_service):
    service = await start_service(public_url="https://gift.example.com/hub", trusted_proxies=("127.0.0.0/8",))
    assert await native_service_urls(service, SPOOFED) == {"https://gift.example.com/hub/native"}


async def test_forwarded_headers_are_honoured_from_trusted_proxies_only(start_service):
    behind_tls = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "client-said.example, shop.example:8443"}
    trusted = await start_service(trusted_proxies=("127.0.0.0/8",))
    assert await native_service_urls(trusted, behind_tls) == {"https://shop.example:8443/native"}
    garbage = {"X-Forwarded-Proto": "gopher", "X-Forwarded-Host": "shop.example/evil"}
    port = trusted.base_url.rsplit(":", 1)[1]
    assert await native_service_urls(trusted, garbage) == {f"http://127.0.0.1:{port}/native"}
    elsewhere = await start_service(trusted_proxies=("10.0.0.0/8",))
    port = elsewhere.base_url.rsplit(":", 1)[1]
    assert await native_service_urls(elsewhere, behind_tls) == {f"http://127.0.0.1:{port}/native"}


def test_public_address_settings_are_read_and_checked(monkeypatch):
    from hub.config import Settings

    monkeypatch.setenv("GIFTCARD_PUBLIC_URL", "https://gift.example.com/")
    monkeypatch.setenv("GIFTCARD_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7 ,::1")
    settings = Settings.from_env()
    assert settings.public_url == "https://gift.example.com"
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.168.1.7/32", "::1/128")
    for bad in ("gift.example.com", "ftp://gift.example.com", "https://gift.example.com/?a=1", "https://u:p@x.com"):
        monkeypatch.setenv("GIFTCARD_PUBLIC_URL", bad)
        with pytest.raises(ValueError, match="GIFTCARD_PUBLIC_URL"):
            Settings.from_env()
    monkeypatch.setenv("GIFTCARD_PUBLIC_URL", "")
    monkeypatch.setenv("GIFTCARD_TRUSTED_PROXIES", "10.0.0.0/33")
    with pytest.raises(ValueError, match="GIFTCARD_TRUSTED_PROXIES"):
        Settings.from_env()


# ---- 6. DELETE of a provider answers what VTEX's Hub spec documents -----------------------------


@requires_spec
async def test_deleting_a_provider_answers_as_the_hub_spec_documents(service, pool):
    require_spec()
    async with start_reference_provider() as provider:
        await register(service, "Acme", provider)
        async with service.session.delete(f"{service.base_url}{HUB}/Acme", headers=service.headers(HUB)) as response:
            raw, headers, status = await response.read(), response.headers, response.status
        # The spec's 200 documents no content ("does not return any data in the response body"):
        # validate_response fails on any body, and would demand one if the spec ever documented it.
        assert status == 200
        validate_response("hub", "DeleteGiftCardProviderbyID", 200, json.loads(raw) if raw else None)
        assert raw == b"" and headers["Content-Length"] == "0" and "Content-Type" not in headers, dict(headers)
        removed = await pool.fetchval("select count(*) from events where type = 'ProviderRemoved'")
        status, body, headers = await service.call("DELETE", f"{HUB}/Acme")
        assert status == 404 and body["error"]["code"] == "provider_not_found"
        validate_response("hub", "DeleteGiftCardProviderbyID", 404, None)  # documented; our body explains it
        assert await pool.fetchval("select count(*) from events where type = 'ProviderRemoved'") == removed
    document = build_document(service.app)
    answer = document["paths"][f"{HUB}/{{provider_id}}"]["delete"]["responses"]["200"]["description"]
    assert (
        "No body" in answer
        and "content" not in document["paths"][f"{HUB}/{{provider_id}}"]["delete"]["responses"]["200"]
    )
