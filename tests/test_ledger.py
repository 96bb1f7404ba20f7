"""The command service against a real PostgreSQL: every rule holds end to end, retries are
idempotent, refusals write nothing, and concurrent writers never overspend a card."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from ledger.application.commands import Ledger
from ledger.domain import errors
from ledger.domain.giftcard import Client
from ledger.eventstore.store import EventStore, verify_chain
from tests.cards import count_events, issue

pytestmark = pytest.mark.also_on_citus

ROOT = Path(__file__).resolve().parents[1]


async def tx(ledger: Ledger, card_id: str, operation: str, value: str, request_id: str, **extra):
    return await ledger.create_transaction(
        card_id, operation=operation, value=Decimal(value), description="test", request_id=request_id, **extra
    )


async def test_vtex_worked_example(ledger: Ledger):
    issued = await issue(ledger)
    card_id = str(issued.card.id)
    assert (await ledger.card(card_id)).balance == 0
    await tx(ledger, card_id, "Credit", "500", "1")
    spend = await tx(ledger, card_id, "Debit", "120", "2")
    assert (await ledger.card(card_id)).balance == 38000
    await ledger.cancel(card_id, spend.id, value=Decimal("20"), request_id="4")
    assert (await ledger.card(card_id)).balance == 40000
    replay = await tx(ledger, card_id, "Credit", "500", "1")
    assert (await ledger.card(card_id)).balance == 40000
    assert replay.id == (await ledger.card(card_id)).transactions[replay.id].id


async def test_state_survives_a_fresh_process(ledger: Ledger, store: EventStore, clock):
    issued = await issue(ledger)
    card_id = str(issued.card.id)
    await tx(ledger, card_id, "Credit", "10.50", "1")
    spend = await tx(ledger, card_id, "Debit", "3.25", "2")
    await ledger.settle(card_id, spend.id, value=Decimal("3"), request_id="s")
    other = Ledger(store, code_key=ledger.code_key, clock=clock)  # nothing cached
    card = await other.card(card_id)
    assert card.balance == 725
    assert card.transactions[spend.id].settled == 300
    assert card.transactions[spend.id].held == 25


async def test_a_retried_request_id_returns_the_original_and_writes_nothing(ledger: Ledger, pool):
    card_id = str((await issue(ledger)).card.id)
    first = await tx(ledger, card_id, "Credit", "100", "r1")
    events = await count_events(pool)
    again = await tx(ledger, card_id, "Credit", "100", "r1")
    assert again.id == first.id
    assert await count_events(pool) == events
    with pytest.raises(errors.RequestIdReused):
        await tx(ledger, card_id, "Credit", "101", "r1")
    settlement = await ledger.settle(card_id, first.id, value=Decimal("40"), request_id="s1")
    assert (await ledger.settle(card_id, first.id, value=Decimal("40"), request_id="s1")).oid == settlement.oid
    cancellation = await ledger.cancel(card_id, first.id, value=Decimal("10"), request_id="c1")
    assert (await ledger.cancel(card_id, first.id, value=Decimal("10"), request_id="c1")).oid == cancellation.oid
    with pytest.raises(errors.RequestIdReused):
        await ledger.cancel(card_id, first.id, value=Decimal("11"), request_id="c1")
    assert (await ledger.card(card_id)).balance == 9000


async def test_a_retry_from_another_process_sees_the_original(ledger: Ledger, store: EventStore, clock, pool):
    card_id = str((await issue(ledger)).card.id)
    first = await tx(ledger, card_id, "Credit", "100", "r1")
    other = Ledger(store, code_key=ledger.code_key, clock=clock)
    assert (await tx(other, card_id, "Credit", "100", "r1")).id == first.id
    assert await count_events(pool) == 2


async def test_a_stale_cache_neither_overspends_nor_refuses_wrongly(ledger: Ledger, store: EventStore, clock):
    card_id = str((await issue(ledger)).card.id)
    await tx(ledger, card_id, "Credit", "100", "load")
    other = Ledger(store, code_key=ledger.code_key, clock=clock)
    await tx(other, card_id, "Debit", "80", "other-1")
    # `ledger` still caches a balance of 100: its Debit must be re-decided on fresh state.
    with pytest.raises(errors.InsufficientFunds):
        await tx(ledger, card_id, "Debit", "30", "stale-1")
    await tx(other, card_id, "Credit", "50", "other-2")
    # and its cached refusal must not stand once money arrived elsewhere.
    await tx(ledger, card_id, "Debit", "30", "stale-2")
    assert (await ledger.card(card_id)).balance == 4000


@pytest.mark.parametrize("shared_cards", [False, True])
async def test_writers_sharing_cards_catch_up_before_deciding(ledger: Ledger, store: EventStore, clock, shared_cards):
    """Two processes' ledgers taking turns on the same cards (serve --workers 2): with
    ``shared_cards`` each catches its cached card up first and never loses an append's race."""
    a, b = (Ledger(store, code_key=ledger.code_key, clock=clock, shared_cards=shared_cards) for _ in range(2))
    cards = [str((await issue(a)).card.id) for _ in range(3)]
    for card_id in cards:
        await tx(a, card_id, "Credit", "100", "load")
    for turn in range(6):
        await asyncio.gather(*(tx((a, b)[turn % 2], card_id, "Debit", "1", f"d{turn}") for card_id in cards))
    assert [(await a.card(c)).balance for c in cards] == [9400] * 3
    races_lost = a.races_lost + b.races_lost
    assert races_lost == 0 if shared_cards else races_lost > 0


@pytest.mark.parametrize(
    ("operation", "value", "error"),
    [
        ("Debit", "0", errors.InvalidAmount),
        ("Debit", "-1", errors.InvalidAmount),
        ("Credit", "NaN", errors.InvalidAmount),
        ("Credit", "1.001", errors.InvalidAmount),
        ("Credit", "1e20", errors.InvalidAmount),
        ("Refund", "1", errors.InvalidRequest),
        ("Debit", "1000", errors.InsufficientFunds),
    ],
)
async def test_bad_transactions_raise_a_clear_error_and_write_nothing(ledger: Ledger, pool, operation, value, error):
    card_id = str((await issue(ledger)).card.id)
    await tx(ledger, card_id, "Credit", "10", "load")
    before = await count_events(pool)
    with pytest.raises(error) as raised:
        await tx(ledger, card_id, operation, value, "bad")
    assert raised.value.message
    assert await count_events(pool) == before
    assert (await ledger.card(card_id)).balance == 1000


async def test_bad_settlements_and_cancellations_write_nothing(ledger: Ledger, pool):
    card_id = str((await issue(ledger)).card.id)
    await tx(ledger, card_id, "Credit", "10", "load")
    spend = await tx(ledger, card_id, "Debit", "4", "spend")
    before = await count_events(pool)
    with pytest.raises(errors.OverSettlement):
        await ledger.settle(card_id, spend.id, value=Decimal("4.01"), request_id="s")
    with pytest.raises(errors.OverCancellation):
        await ledger.cancel(card_id, spend.id, value=Decimal("5"), request_id="c")
    with pytest.raises(errors.TransactionNotFound):
        await ledger.settle(card_id, "nope", value=Decimal("1"), request_id="s")
    with pytest.raises(errors.CardNotFound):
        await ledger.settle("not-a-card", spend.id, value=Decimal("1"), request_id="s")
    with pytest.raises(errors.CardNotFound):
        await ledger.card("00000000-0000-0000-0000-000000000000")
    assert await count_events(pool) == before


async def test_bad_cards_are_refused_and_write_nothing(ledger: Ledger, pool):
    with pytest.raises(errors.UnknownCurrency):
        await issue(ledger, currency="ABC")
    with pytest.raises(errors.InvalidCard):
        await issue(ledger, expiring_date=ledger.clock() - timedelta(days=1))
    await issue(ledger, relation_name="taken")
    with pytest.raises(errors.DuplicateRelationName):
        await issue(ledger, relation_name="taken")
    assert await count_events(pool) == 1
    assert await pool.fetchval("select count(*) from card_lookup") == 1


async def test_text_postgres_cannot_store_is_refused_and_leaves_the_card_usable(ledger: Ledger, pool):
    card_id = str((await issue(ledger)).card.id)
    with pytest.raises(errors.InvalidRequest):
        await ledger.create_transaction(
            card_id, operation="Credit", value=Decimal(1), description="nul \x00", request_id="r"
        )
    await tx(ledger, card_id, "Credit", "1", "r")
    assert (await ledger.card(card_id)).balance == 100
    assert await count_events(pool) == 2


async def test_expiry_is_driven_by_the_clock(ledger: Ledger, clock):
    card_id = str((await issue(ledger, expiring_date=clock.now + timedelta(days=1))).card.id)
    await tx(ledger, card_id, "Credit", "5", "load")
    clock.advance(timedelta(days=2))
    with pytest.raises(errors.CardExpired):
        await tx(ledger, card_id, "Debit", "1", "late")


async def test_restricted_to_owner_end_to_end(ledger: Ledger):
    card_id = str((await issue(ledger, restricted_to_owner=True, profile_id="owner-1")).card.id)
    await tx(ledger, card_id, "Credit", "5", "load")
    with pytest.raises(errors.NotOwner):
        await tx(ledger, card_id, "Debit", "1", "x", client=Client(id="intruder"))
    await tx(ledger, card_id, "Debit", "1", "y", client=Client(id="owner-1"))


async def test_find_by_code_and_owner(ledger: Ledger):
    issued = await issue(ledger, profile_id="alice")
    await issue(ledger, profile_id="bob")
    card_id = str(issued.card.id)
    assert str((await ledger.find_by_code(issued.redemption_code)).id) == card_id
    assert str((await ledger.find_by_code(issued.redemption_code.lower())).id) == card_id
    assert await ledger.find_by_code("AAAA-BBBB-CCCC-DDDD") is None
    assert [str(c.id) for c in await ledger.find_by_owner(Client(email="alice"))] == [card_id]
    assert await ledger.find_by_owner(Client()) == []


async def test_a_card_issued_before_is_checked_by_its_stored_code_hash(ledger: Ledger, store: EventStore, clock, pool):
    """Another process (nothing cached) reads the code hash the card was issued with; no new state is needed."""
    issued = await issue(ledger)
    card_id = str(issued.card.id)
    other = Ledger(store, code_key=ledger.code_key, clock=clock)
    with pytest.raises(errors.RedemptionCodeMismatch):
        await tx(other, card_id, "Credit", "10", "load", redemption_code=(await issue(ledger)).redemption_code)
    await tx(other, card_id, "Credit", "10", "load", redemption_code=issued.redemption_code)
    await tx(other, card_id, "Debit", "4", "order", redemption_token=ledger.redemption_token(card_id))
    assert (await other.card(card_id)).balance == 600
    with pytest.raises(errors.CardNotFound):  # an unknown card is not found, whatever code it is sent with
        await tx(other, str(uuid.uuid4()), "Debit", "1", "x", redemption_code=issued.redemption_code)


async def test_redemption_code_is_never_stored_in_clear(ledger: Ledger, pool):
    issued = await issue(ledger)
    dump = await pool.fetchval("select string_agg(t::text, ' ') from (select * from events) t") + await pool.fetchval(
        "select string_agg(t::text, ' ') from (select * from card_lookup) t"
    )
    assert issued.redemption_code not in dump
    assert issued.redemption_code.replace("-", "") not in dump


async def test_snapshots_make_long_histories_load_from_the_tail(ledger: Ledger, store: EventStore, clock, pool):
    card_id = str((await issue(ledger)).card.id)
    await tx(ledger, card_id, "Credit", "1000", "load")
    for i in range(250):
        await tx(ledger, card_id, "Debit", "1", f"d{i}")
    await ledger.snapshots_saved()
    assert await pool.fetchval("select version from snapshots where stream_id = $1", card_id) == 200
    fresh = Ledger(store, code_key=ledger.code_key, clock=clock)
    card = await fresh.card(card_id)
    assert card.version == 252
    assert card.balance == 75000
    verify_chain(await store.read_stream(card_id))


class HeldSnapshots(EventStore):
    """A real store whose snapshot writes wait until ``released`` is set, each write's size noted."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.released = asyncio.Event()
        self.writes: list[int] = []

    async def save_snapshots(self, snapshots) -> None:
        await self.released.wait()
        self.writes.append(len(snapshots))
        await super().save_snapshots(snapshots)


async def test_a_command_that_makes_its_snapshot_due_answers_before_it_is_written(pool, clock):
    store = HeldSnapshots(pool)
    ledger = Ledger(store, code_key=b"k" * 32, clock=clock, snapshot_interval_events=2)
    card_id = str((await issue(ledger)).card.id)
    await asyncio.wait_for(tx(ledger, card_id, "Credit", "10", "c"), timeout=10)  # version 2: a snapshot due
    assert await pool.fetchval("select count(*) from snapshots") == 0
    store.released.set()
    await ledger.snapshots_saved()
    assert await pool.fetchval("select version from snapshots where stream_id = $1", card_id) == 2
    assert (await Ledger(store, code_key=b"k" * 32, clock=clock).card(card_id)).balance == 1000


async def test_snapshots_due_together_are_written_together(pool, clock):
    store = HeldSnapshots(pool)
    ledger = Ledger(store, code_key=b"k" * 32, clock=clock, snapshot_interval_events=2)
    cards = [str((await issue(ledger)).card.id) for _ in range(20)]
    await asyncio.gather(*(tx(ledger, card_id, "Credit", "10", "c") for card_id in cards))
    store.released.set()
    await ledger.snapshots_saved()
    assert sum(store.writes) == 20 and len(store.writes) <= 2, store.writes  # the first one due, then the rest
    assert await pool.fetchval("select count(*) from snapshots where version = 2") == 20


async def test_card_as_of_replays_history_to_an_instant(ledger: Ledger, pool):
    card_id = str((await issue(ledger)).card.id)
    await tx(ledger, card_id, "Credit", "100", "load")
    instant = await pool.fetchval("select clock_timestamp()")
    await tx(ledger, card_id, "Debit", "30", "spend")
    assert (await ledger.card_as_of(card_id, instant)).balance == 10000
    assert (await ledger.card(card_id)).balance == 7000


async def test_concurrent_debits_in_one_process_never_overspend(ledger: Ledger):
    card_id = str((await issue(ledger)).card.id)
    await tx(ledger, card_id, "Credit", "50", "load")

    async def attempt(i: int) -> bool:
        try:
            await tx(ledger, card_id, "Debit", "1", f"d{i}")
            return True
        except errors.InsufficientFunds:
            return False

    results = await asyncio.gather(*(attempt(i) for i in range(80)))
    assert sum(results) == 50
    assert (await ledger.card(card_id)).balance == 0


async def test_200_debits_from_two_processes_exactly_100_succeed(ledger: Ledger, database_url: str, store, clock):
    card_id = str((await issue(ledger)).card.id)
    await tx(ledger, card_id, "Credit", "100", "load")
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.debit_worker",
            database_url,
            card_id,
            "100",
            tag,
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        for tag in ("a", "b")
    ]
    outputs = await asyncio.gather(*(w.communicate() for w in workers))
    assert all(w.returncode == 0 for w in workers)
    successes = [int(out.strip()) for out, _ in outputs]
    assert sum(successes) == 100, successes
    fresh = Ledger(store, code_key=ledger.code_key, clock=clock)
    card = await fresh.card(card_id)
    assert card.balance == 0
    assert sum(t.value for t in card.transactions.values() if t.operation == "Debit") == 10000
    verify_chain(await store.read_stream(card_id))
