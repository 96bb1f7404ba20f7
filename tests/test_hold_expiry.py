"""Hold expiry: an authorization never settled nor cancelled releases its hold after
GIFTCARD_HOLD_TTL, exactly once, with the clock driven by the test (no sleeping on real time)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import pytest

from hub.config import parse_duration_s
from ledger.application.commands import Ledger
from ledger.application.hold_expiry import sweep_once
from ledger.domain import errors
from tests.cards import issue
from tests.test_domain import NOW, credit, debit, new_card, settle

pytestmark = pytest.mark.also_on_citus

TTL = timedelta(hours=72)


# ---- the rule, on the aggregate ---------------------------------------------------------------


def test_an_expired_hold_is_voided_and_the_balance_restored():
    card = new_card()
    credit(card, 1000)
    spend = debit(card, 300)
    assert card.void_expired_hold(transaction_id=spend.id, oid="v1", hold_ttl=TTL, now=NOW + TTL / 2) is None
    void = card.void_expired_hold(transaction_id=spend.id, oid="v1", hold_ttl=TTL, now=NOW + TTL)
    assert void.value == 300 and card.balance == 1000
    assert spend.held == 0 and spend.released == 300 and spend.cancellations == (void,)
    assert card.void_expired_hold(transaction_id=spend.id, oid="v2", hold_ttl=TTL, now=NOW + 2 * TTL) is None


def test_only_the_unsettled_remainder_is_voided():
    card = new_card()
    credit(card, 1000)
    spend = debit(card, 300)
    settle(card, spend, 120, "s1")
    void = card.void_expired_hold(transaction_id=spend.id, oid="v", hold_ttl=TTL, now=NOW + TTL)
    assert void.value == 180 and card.balance == 880
    assert spend.settled + spend.released == spend.value


def test_a_settlement_after_the_void_is_refused_as_a_conflict():
    card = new_card()
    credit(card, 1000)
    spend = debit(card, 300)
    card.void_expired_hold(transaction_id=spend.id, oid="v", hold_ttl=TTL, now=NOW + TTL)
    with pytest.raises(errors.HoldVoided, match="voided"):
        settle(card, spend, 1, "late")


def test_credits_are_never_voided():
    card = new_card()
    load = credit(card, 1000)
    assert card.void_expired_hold(transaction_id=load.id, oid="v", hold_ttl=TTL, now=NOW + 10 * TTL) is None
    assert card.balance == 1000


def test_durations_parse():
    assert [parse_duration_s(t) for t in ("", "0", "3600", "90s", "30m", "72h", "7d")] == [
        0, 0, 3600, 90, 1800, 259200, 604800,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        parse_duration_s("three days")


# ---- end to end: the sweeper, the service, several processes ---------------------------------------


async def debit_over_http(service, card_id: str, value, request_id: str) -> str:
    status, answer, _ = await service.call(
        "POST",
        f"/native/giftcards/{card_id}/transactions",
        {"operation": "Debit", "value": value, "requestId": request_id},
    )
    assert status == 200, answer
    return answer["id"]


async def projected(service, pool, transaction_id: str) -> None:
    """The sweeper reads the transaction-history read model: wait until it has the transaction."""
    for _ in range(200):
        if await pool.fetchval("select 1 from read_transactions where transaction_id = $1", transaction_id):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the read model never caught up")


async def test_the_sweeper_voids_expired_holds_once_and_settling_after_is_409(start_service, pool, clock):
    service = await start_service()
    status, card, _ = await service.call(
        "POST", "/native/giftcards", {"relationName": "h", "caption": "c", "profileId": "p"}
    )
    card_id = card["id"]
    await service.call(
        "POST", f"/native/giftcards/{card_id}/transactions", {"operation": "Credit", "value": 100, "requestId": "l"}
    )
    old = await debit_over_http(service, card_id, 30, "old")
    clock.advance(timedelta(hours=48))
    young = await debit_over_http(service, card_id, 20, "young")
    await projected(service, pool, old)
    await projected(service, pool, young)
    ledger = service.app[_ledger_key()]

    clock.advance(timedelta(hours=30))  # old: 78 h, past the TTL; young: 30 h
    assert await sweep_once(pool, ledger, TTL, "VtexGiftCard") == 1
    assert await sweep_once(pool, ledger, TTL, "VtexGiftCard") == 0, "a second sweep voids nothing again"
    got = (await service.call("GET", f"/native/giftcards/{card_id}"))[1]
    assert got["balance"] == 80  # 100 - 30 - 20 + 30 released

    status, body, _ = await service.call(
        "POST", f"/native/giftcards/{card_id}/transactions/{old}/settlements", {"value": 1, "requestId": "late"}
    )
    assert status == 409 and body["error"]["code"] == "hold_voided"
    cancellations = (await service.call("GET", f"/native/giftcards/{card_id}/transactions/{old}/cancellations"))[1]
    assert [c["value"] for c in cancellations] == [30], "the void is listed, so a hub never cancels it twice"
    status, _, _ = await service.call(
        "POST", f"/native/giftcards/{card_id}/transactions/{young}/settlements", {"value": 20, "requestId": "s"}
    )
    assert status == 200, "a hold within its period settles as usual"
    voided = await pool.fetchval("select count(*) from events where type like '%.Voided'")
    assert voided == 1


async def test_several_processes_sweeping_at_once_void_each_hold_exactly_once(ledger: Ledger, store, clock, pool):
    card_id = str((await issue(ledger)).card.id)
    await ledger.create_transaction(card_id, operation="Credit", value=Decimal(100), description="", request_id="l")
    holds = [
        (await ledger.create_transaction(
            card_id, operation="Debit", value=Decimal(1), description="", request_id=f"d{i}"
        )).id
        for i in range(20)
    ]  # fmt: skip
    clock.advance(TTL)
    sweepers = [Ledger(store, code_key=ledger.code_key, clock=clock) for _ in range(4)]
    results = await asyncio.gather(
        *(s.void_expired_hold(card_id, tid, hold_ttl=TTL) for s in sweepers for tid in holds)
    )
    assert sum(r is not None for r in results) == 20
    assert await pool.fetchval("select count(*) from events where type like '%.Voided'") == 20
    assert (await ledger.card(card_id)).balance == 10000


async def test_hub_cancellation_after_a_void_posts_only_what_remains(start_service, pool, clock):
    service = await start_service()
    base = "/api/giftcardproviders/VtexGiftCard/giftcards"
    _, card, _ = await service.call("POST", base, {"relationName": "hv", "caption": "c", "profileId": "p"})
    await service.call(
        "POST", f"{base}/{card['id']}/transactions", {"operation": "Credit", "value": 50, "requestId": "l"}
    )
    _, debit_ref, _ = await service.call(
        "POST", f"{base}/{card['id']}/transactions", {"operation": "Debit", "value": 40, "requestId": "d"}
    )
    tx = f"{base}/{card['id']}/transactions/{debit_ref['id']}"
    await service.call("POST", f"{tx}/settlements", {"value": 15, "requestId": "s"})
    clock.advance(TTL)
    await service.app[_ledger_key()].void_expired_hold(card["id"], debit_ref["id"], hold_ttl=TTL)
    status, cancellation, _ = await service.call("POST", f"{tx}/cancellations", {"value": 40, "requestId": "c"})
    assert status == 200 and cancellation["value"] == 15, "25 were voided already; only the settled 15 is refunded"
    assert (await service.call("GET", f"{base}/{card['id']}"))[1]["balance"] == 50


def _ledger_key():
    from hub.http.state import LEDGER

    return LEDGER
