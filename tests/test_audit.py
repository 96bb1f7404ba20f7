"""Auditors: a card's history replayed (library, CLI, HTTP), and ``audit verify`` over the whole
ledger: chains, invariants and read models, failures named with exit 1, memory flat."""

from __future__ import annotations

import json
import tracemalloc
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from hub.http import openapi
from hub.http.state import LEDGER
from ledger.application.commands import Ledger
from ledger.domain.snapshot import restore_snapshot, take_snapshot
from ledger.eventstore.codec import canonical_json
from ledger.eventstore.store import NewEvent
from projections.audit.auditors import RULE_SNAPSHOT, audit_card, render_card_audit, verify
from projections.audit.replay import RULE_BALANCE, RULE_CHAIN, RULE_REFUNDED, RULE_SETTLED_RELEASED, RULE_VERSIONS
from tests.audit_ledgers import (
    EVENTS_PER_FABRICATED_CARD,
    NATIVE,
    as_owner_bypassing_immutability,
    catch_up,
    finance_cli,
    write_forwarded,
    write_history,
    write_many_cards,
)

pytestmark = pytest.mark.also_on_citus

AUDIT_ROUTE = "/api/audit/cards/{card_id}"


# ---- one card ------------------------------------------------------------------------------------


async def test_a_card_is_replayed_with_the_balance_after_every_event(ledger, clock, store):
    history = await write_history(ledger, clock)
    document = render_card_audit(await audit_card(store, history.usd), NATIVE)
    steps = [(e["version"], e["type"], e["amount"], e.get("released"), e["balance"]) for e in document["events"]]
    assert steps == [
        (1, "Issued", None, None, Decimal("0.00")),
        (2, "Credited", Decimal("100.00"), None, Decimal("100.00")),
        (3, "Debited", Decimal("30.50"), None, Decimal("69.50")),
        (4, "Settled", Decimal("20.00"), None, Decimal("69.50")),
        (5, "Cancelled", Decimal("15.00"), Decimal("10.50"), Decimal("84.50")),  # and 4.50 refunded
        (6, "Cancelled", Decimal("5.00"), Decimal("5.00"), Decimal("79.50")),
    ]
    assert document["valid"] and document["failures"] == []
    assert document["state"]["version"] == 6
    assert document["state"]["balance"] == Decimal("79.50") == Decimal((await ledger.card(history.usd)).balance) / 100
    assert document["events"][1]["effectiveAt"] == "2026-01-15T12:00:00.000000Z"  # the ledger's clock, chained


async def test_a_card_as_of_an_instant_is_the_state_after_the_last_event_by_then(ledger, clock, store):
    history = await write_history(ledger, clock)
    audit = await audit_card(store, history.usd, datetime(2026, 1, 16, 18, tzinfo=UTC))
    document = render_card_audit(audit, NATIVE)
    assert document["asOf"] == "2026-01-16T18:00:00.000000Z"
    assert [e["afterAsOf"] for e in document["events"]] == [False, False, False, False, True, True]
    state = document["state"]
    assert (state["version"], state["balance"], state["authorized"], state["settled"]) == (
        4,
        Decimal("69.50"),
        Decimal("10.50"),  # 30.50 debited, 20 of it settled
        Decimal("20.00"),
    )
    before_issue = await audit_card(store, history.usd, datetime(2026, 1, 1, tzinfo=UTC))
    assert before_issue.state is None and len(before_issue.entries) == 6


async def test_audit_card_on_the_command_line(ledger, clock, database_url):
    history = await write_history(ledger, clock)
    code, out, err = await finance_cli(database_url, "audit", "card", history.usd, "--as-of", "2026-01-16T18:00:00")
    assert code == 0, err
    assert "state at version 4: balance 69.50" in out and "(after as-of)" in out and "ok" in out
    code, out, err = await finance_cli(database_url, "audit", "card", history.bhd, "--json")
    assert code == 0, err
    document = json.loads(out)
    assert [e["balance"] for e in document["events"]] == [0.0, 12.345, 12.34]  # numbers, as the HTTP API writes
    code, _, err = await finance_cli(database_url, "audit", "card", "00000000-0000-0000-0000-000000000000")
    assert code == 2 and "not found" in err


@pytest.fixture
async def audit_service(start_service):
    return await start_service()


async def test_audit_card_over_http(audit_service, clock):
    history = await write_history(audit_service.app[LEDGER], clock)
    status, body, _ = await audit_service.call("GET", f"/api/audit/cards/{history.usd}?asOf=2026-01-16T18:00:00Z")
    assert status == 200, body
    assert body["cardId"] == history.usd and body["currency"] == "USD" and body["valid"]
    assert [e["balance"] for e in body["events"]] == [0, 100, 69.5, 69.5, 84.5, 79.5]
    assert body["state"]["version"] == 4 and body["state"]["balance"] == 69.5

    status, body, _ = await audit_service.call("GET", f"/api/audit/cards/{history.usd}?asOf=yesterday")
    assert status == 400 and "asOf" in body["error"]["message"]
    status, body, _ = await audit_service.call("GET", "/api/audit/cards/no-such-card")
    assert status == 404 and body["error"]["code"] == "card_not_found"
    async with audit_service.session.get(f"{audit_service.base_url}/api/audit/cards/{history.usd}") as response:
        assert response.status == 401  # hub-consumer credentials, as every /api route
    assert openapi.describe("GET", AUDIT_ROUTE) is not None


# ---- the whole ledger ---------------------------------------------------------------------------


async def test_verify_passes_on_a_sound_ledger_and_compares_every_read_model(ledger, clock, store, pool, database_url):
    history = await write_history(ledger, clock)
    await write_forwarded(store)
    await catch_up(pool)
    code, out, err = await finance_cli(database_url, "audit", "verify", "--json", "--batch-events-max", "3")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["ok"] and report["failuresTotal"] == 0 and report["cards"] == 3
    compared = {m["name"]: (m["compared"], m["lagEvents"]) for m in report["readModels"]}
    acme_days = await pool.fetchval(  # forwarded calls count on the day the hub recorded them: today, usually
        "select count(distinct (recorded_at at time zone 'UTC')::date) from events where type = 'ProviderCallForwarded'"
    )
    assert compared == {
        "card_balances": (3, 0),
        "transaction_history": (5 + 1, 0),  # five native transactions, one forwarded provider's totals
        "daily_totals": (3 + 2 + acme_days, 0),  # USD on three days, JPY and BHD on one, Acme's
    }
    code, out, _ = await finance_cli(database_url, "audit", "verify")
    assert code == 0 and "all hold" in out and history.usd not in out


async def test_verify_names_a_tampered_event_and_a_removed_one(ledger, clock, store, pool, database_url):
    history = await write_history(ledger, clock)
    await as_owner_bypassing_immutability(
        pool,
        "update events set data = jsonb_set(data, '{value}', '1') where stream_id = $1 and version = 4",
        history.usd,
    )
    await as_owner_bypassing_immutability(pool, "delete from events where stream_id = $1 and version = 2", history.bhd)

    code, out, err = await finance_cli(database_url, "audit", "verify")
    assert code == 1, out + err
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any(history.usd in f and "version 4" in f and RULE_CHAIN in f for f in failures), out
    assert any(history.bhd in f and "version 3" in f and RULE_VERSIONS in f for f in failures), out
    assert not any(history.jpy in f for f in failures)

    code, out, _ = await finance_cli(database_url, "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert {(f["streamId"], f["version"], f["rule"]) for f in report["failures"]} >= {
        (history.usd, 4, RULE_CHAIN),
        (history.bhd, 3, RULE_VERSIONS),
    }
    code, out, _ = await finance_cli(database_url, "audit", "card", history.usd)
    assert code == 1 and RULE_CHAIN in out


async def test_verify_names_broken_invariants_in_events_whose_chain_is_intact(ledger, clock, store, pool):
    """Events appended past the domain's guards (as a buggy writer could): the chain holds, the rules do not."""
    history = await write_history(ledger, clock)
    card = await ledger.card(history.usd)
    last_hash = (await store.read_stream(history.usd))[-1].hash
    debit = {"transaction_id": "t-over", "value": 10_000, "date": "2026-01-18T00:00:00+00:00", "request_id": "x"}
    debit |= {"description": "", "order_info": None, "timestamp": "2026-01-18T00:00:00+00:00"}
    settle = {"transaction_id": history.debit, "oid": "o-over", "value": 5_000, "request_id": "y"}
    settle |= {"date": "2026-01-18T00:00:00+00:00", "timestamp": "2026-01-18T00:00:00+00:00"}
    await store.append(
        history.usd,
        card.version,
        [
            NewEvent("ledger.domain.giftcard:GiftCard.Debited", canonical_json(json.dumps(debit))),
            NewEvent("ledger.domain.giftcard:GiftCard.Settled", canonical_json(json.dumps(settle))),
        ],
        previous_hash=last_hash,
    )
    found = []
    report = await verify(pool, NATIVE, on_failure=found.append)
    assert not report.ok and report.failures == found
    named = {(f.stream_id, f.version, f.rule) for f in found}
    assert (history.usd, 7, RULE_BALANCE) in named  # 79.50 - 100.00
    assert (history.usd, 8, RULE_SETTLED_RELEASED) in named  # 20 + 50 settled, 10.50 released > 30.50
    assert not any(f.rule == RULE_CHAIN for f in found)
    assert "balance is -2050 minor units" in next(f.message for f in found if f.rule == RULE_BALANCE)


async def test_verify_names_a_refund_beyond_what_was_settled(ledger, clock, store, pool):
    history = await write_history(ledger, clock)
    card = await ledger.card(history.usd)
    last_hash = (await store.read_stream(history.usd))[-1].hash
    # The debit settled 20.00 and refunded 4.50 already: refunding 20.00 more would refund 24.50 of 20.00.
    cancel = {"transaction_id": history.debit, "oid": "o", "value": 2000, "released": 0, "refunded": 2000}
    cancel |= {"request_id": "z", "date": "2026-01-18T00:00:00+00:00", "timestamp": "2026-01-18T00:00:00+00:00"}
    event = NewEvent("ledger.domain.giftcard:GiftCard.Cancelled", canonical_json(json.dumps(cancel)))
    await store.append(history.usd, card.version, [event], previous_hash=last_hash)
    report = await verify(pool, NATIVE)
    assert [(f.stream_id, f.version, f.rule) for f in report.failures] == [(history.usd, 7, RULE_REFUNDED)]


async def test_verify_names_a_read_model_that_differs_from_the_replay(ledger, clock, pool, database_url):
    history = await write_history(ledger, clock)
    await catch_up(pool)
    await pool.execute(
        "update read_card_balances set available = available + 1, credited = credited + 1 where card_id = $1",
        history.jpy,
    )
    await pool.execute(
        "update read_transactions set settled = settled + 100 where card_id = $1 and transaction_id = $2",
        history.usd,
        history.debit,
    )
    await pool.execute("update read_daily_totals set loaded = loaded + 1 where currency = 'BHD'")
    code, out, err = await finance_cli(database_url, "audit", "verify")
    assert code == 1, out + err
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any(
        history.jpy in f and "read_model_card_balances" in f and "available 501 in read model" in f for f in failures
    )
    assert any(history.usd in f and history.debit in f and "read_model_transaction_history" in f for f in failures)
    assert any("read_model_daily_totals" in f and "2026-01-16 BHD" in f for f in failures), out
    assert len(failures) == 3, out


async def test_verify_compares_each_snapshot_with_the_replay_at_its_version(store, clock, pool):
    """Snapshots are what the ledger loads long histories from: an altered one would change balances
    without touching an event."""
    ledger = Ledger(store, code_key=b"k" * 32, clock=clock, snapshot_interval_events=4)
    history = await write_history(ledger, clock)  # the USD card reaches version 6: a snapshot at 4
    await ledger.snapshots_saved()
    assert await pool.fetchval("select version from snapshots where stream_id = $1", history.usd) == 4
    assert (await verify(pool, NATIVE)).ok

    altered = restore_snapshot(await pool.fetchval("select state from snapshots where stream_id = $1", history.usd))
    altered.balance = 1000000
    await pool.execute("update snapshots set state = $1 where stream_id = $2", take_snapshot(altered), history.usd)
    report = await verify(pool, NATIVE)
    named = {(f.stream_id, f.version, f.rule): f.message for f in report.failures}
    assert list(named) == [(history.usd, 4, RULE_SNAPSHOT)]
    assert "available 1000000 in the snapshot, 6950 by replay" in named[(history.usd, 4, RULE_SNAPSHOT)]
    altered.balance, altered.caption = 6950, "altered"  # a field no balance figure shows: named all the same
    await pool.execute("update snapshots set state = $1 where stream_id = $2", take_snapshot(altered), history.usd)
    [failure] = (await verify(pool, NATIVE)).failures
    assert failure.message == "the snapshot differs from the replay at its version: caption differs"
    await pool.execute("update snapshots set version = 99 where stream_id = $1", history.usd)
    orphaned = {(f.stream_id, f.version, f.rule) for f in (await verify(pool, NATIVE)).failures}
    assert orphaned == {(history.usd, 99, RULE_SNAPSHOT)}


async def test_verify_compares_a_lagging_read_model_only_up_to_its_checkpoint(ledger, clock, pool):
    history = await write_history(ledger, clock)
    await catch_up(pool)
    await ledger.create_transaction(
        history.jpy, operation="Debit", value=Decimal(200), description="later", request_id="later"
    )
    report = await verify(pool, NATIVE)
    assert report.ok, [f.line() for f in report.failures]
    assert {m.name: m.lag_events for m in report.read_models} == {
        "card_balances": 1,
        "transaction_history": 1,
        "daily_totals": 1,
    }


async def test_verify_memory_stays_flat_however_large_the_ledger(pool, clock):
    """Ten times the events, about the same peak: one batch, one stream and a bounded buffer of cards
    awaiting comparison in memory at a time. (The read models are caught up on the small ledger only, to
    keep the test fast: the later cards are compared as not projected yet, through the same buffers.)"""
    small_cards, batch_events, cards_checked = 150, 250, 50  # the small ledger already fills every buffer

    async def peak_bytes() -> tuple[int, int]:
        tracemalloc.start()
        try:
            report = await verify(pool, NATIVE, batch_events_max=batch_events, cards_per_check_max=cards_checked)
            assert report.ok, [f.line() for f in report.failures[:5]]
            return tracemalloc.get_traced_memory()[1], report.events
        finally:
            tracemalloc.stop()

    await write_many_cards(pool, clock.now, small_cards)
    await catch_up(pool)
    small_peak, small_events = await peak_bytes()
    await write_many_cards(pool, clock.now, small_cards * 9)
    large_peak, large_events = await peak_bytes()
    assert large_events == 10 * small_events == 10 * small_cards * EVENTS_PER_FABRICATED_CARD
    assert large_peak < small_peak * 1.5, (small_peak, large_peak)


async def test_verify_split_between_processes_names_each_failure_once(ledger, clock, pool, database_url):
    """Two walkers, each a share of the streams in one snapshot: the same report as one walker, every
    failure named once, whichever share found it, and the totals that span every card added up once."""
    await write_history(ledger, clock)
    await write_many_cards(pool, clock.now, 20)
    await catch_up(pool)
    first, last = await pool.fetchrow("select min(stream_id), max(stream_id) from events")
    for stream_id in (first, last):
        await as_owner_bypassing_immutability(
            pool, "update events set hash = '\\x00'::bytea where stream_id = $1 and version = 2", stream_id
        )
    await pool.execute(
        "update read_card_balances set available = available + 1, credited = credited + 1 where card_id = $1", last
    )
    await pool.execute("update read_daily_totals set loaded = loaded + 1 where currency = 'BHD'")

    one = await verify(pool, NATIVE)
    two = await verify(pool, NATIVE, database_url=database_url, walkers=2)

    lines = sorted(f.line() for f in two.failures)
    assert lines == sorted(f.line() for f in one.failures) and len(set(lines)) == len(lines) == two.failures_total
    assert {first, last} <= {f.stream_id for f in two.failures}
    assert any(f.rule == "read_model_card_balances" and f.stream_id == last for f in two.failures)
    assert any(f.rule == "read_model_daily_totals" for f in two.failures)  # compared once, over both shares
    assert (two.events, two.streams, two.cards, two.totals) == (one.events, one.streams, one.cards, one.totals)
    assert two.read_models == one.read_models


@pytest.mark.parametrize("walkers", [1, 2])
async def test_verify_names_read_model_rows_no_event_creates(ledger, clock, pool, database_url, walkers):
    """A row of a card or a transaction no event creates is named once, by one walker or two (verify
    counts the rows the walked cards explain, and looks for these only when some row is left over)."""
    history = await write_history(ledger, clock)
    await catch_up(pool)
    ghost = "00000000-0000-4000-8000-000000000001"
    await pool.execute(
        "insert into read_card_balances select $2, currency, available, authorized, settled, credited, debited,"
        " relation_name, emission_date, expiring_date, issued_at, last_activity_at"
        " from read_card_balances where card_id = $1",
        history.jpy,
        ghost,
    )
    await pool.execute(
        "insert into read_transactions select provider, $3, transaction_id, source, operation, currency, value,"
        " settled, cancelled, released, refunded, description, request_id, null, date, position"
        " from read_transactions where card_id = $1 and transaction_id = $2",
        history.usd,
        history.debit,
        ghost,
    )
    report = await verify(pool, NATIVE, database_url=database_url, walkers=walkers)
    named = sorted((f.stream_id, f.rule, f.message) for f in report.failures)
    assert named == [
        (ghost, "read_model_card_balances", "a row exists for a card with no events"),
        (ghost, "read_model_transaction_history", f"transaction {history.debit} has a row but no event"),
    ]
    assert report.failures_total == 2
