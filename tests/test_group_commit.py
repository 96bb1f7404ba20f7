"""Group commit: concurrent commands on different cards share statements and commits, and each
is still judged alone: a lost race or a bad request fails only its own command."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import asyncpg
import pytest

from ledger.application.commands import CommandTimedOut, Ledger
from ledger.domain import errors
from ledger.eventstore.store import _APPEND_EACH, EventStore, verify_chain
from ledger.postgres.database import create_pool
from tests.cards import count_events, issue
from tests.plans import indexes_used

pytestmark = pytest.mark.also_on_citus


class CountingStore(EventStore):
    """The real store, counting how many events each shared statement carried."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.batches: list[int] = []

    async def append_each(self, appends):
        self.batches.append(len(appends))
        return await super().append_each(appends)


async def funded_cards(ledger: Ledger, count: int) -> list[str]:
    cards = [str((await issue(ledger)).card.id) for _ in range(count)]
    for card_id in cards:
        await ledger.create_transaction(card_id, operation="Credit", value=Decimal(10), description="", request_id="l")
    return cards


async def test_concurrent_commands_on_different_cards_share_commits(pool, clock):
    store = CountingStore(pool)
    ledger = Ledger(store, code_key=b"k" * 32, clock=clock)
    cards = await funded_cards(ledger, 40)
    store.batches.clear()
    await asyncio.gather(
        *(
            ledger.create_transaction(card, operation="Debit", value=Decimal(1), description="", request_id=f"d{i}")
            for card in cards
            for i in range(3)
        )
    )
    assert sum(store.batches) == 120 - store.batches.count(0)
    assert max(store.batches) > 1, "commands arriving together went out together"
    assert len(store.batches) < 120
    for card in cards:
        assert (await ledger.card(card)).balance == 700
        verify_chain(await store.read_stream(card))


async def test_a_lost_race_in_a_batch_fails_only_its_own_command(store, pool, clock):
    first = Ledger(store, code_key=b"k" * 32, clock=clock)
    cards = await funded_cards(first, 10)
    second = Ledger(store, code_key=b"k" * 32, clock=clock)
    await second.create_transaction(cards[0], operation="Debit", value=Decimal(9), description="", request_id="x")
    # `first` still caches cards[0] at its old version: its Debit loses the race, retries on
    # fresh state and is refused; every other Debit of the same batch is untouched.
    results = await asyncio.gather(
        *(
            first.create_transaction(c, operation="Debit", value=Decimal(2), description="", request_id="y")
            for c in cards
        ),
        return_exceptions=True,
    )
    assert isinstance(results[0], errors.InsufficientFunds)
    assert all(not isinstance(r, Exception) for r in results[1:])
    assert [(await first.card(c)).balance for c in cards] == [100] + [800] * 9


async def test_a_request_postgres_cannot_store_fails_alone(ledger, pool):
    cards = await funded_cards(ledger, 8)
    before = await count_events(pool)
    results = await asyncio.gather(
        *(
            ledger.create_transaction(
                card, operation="Debit", value=Decimal(1), description="nul \x00" if n == 3 else "ok", request_id="d"
            )
            for n, card in enumerate(cards)
        ),
        return_exceptions=True,
    )
    assert isinstance(results[3], errors.InvalidRequest)
    assert sum(not isinstance(r, Exception) for r in results) == 7
    assert await count_events(pool) == before + 7


@pytest.mark.parametrize("repeat", range(2))
async def test_the_same_card_never_appears_twice_in_one_statement(pool, clock, repeat):
    store = CountingStore(pool)
    ledger = Ledger(store, code_key=b"k" * 32, clock=clock)
    [card] = await funded_cards(ledger, 1)
    other = Ledger(store, code_key=b"k" * 32, clock=clock)  # another "process" on the same card
    results = await asyncio.gather(
        *(
            led.create_transaction(card, operation="Debit", value=Decimal(1), description="", request_id=f"{n}-{i}")
            for n, led in enumerate((ledger, other))
            for i in range(4)
        ),
        return_exceptions=True,
    )
    assert [r for r in results if isinstance(r, Exception)] == []
    assert (await ledger.card(card)).balance == 1000 - 8 * 100
    verify_chain(await store.read_stream(card))


async def test_two_processes_batching_the_same_cards_in_opposite_orders_never_deadlock(store, clock):
    """Each batch inserts in card order, so two writers over the same cards wait in one order, never
    in a cycle; a deadlock would surface here as an exception instead of a retried lost race."""
    first = Ledger(store, code_key=b"k" * 32, clock=clock)
    cards = await funded_cards(first, 20)
    second = Ledger(store, code_key=b"k" * 32, clock=clock)
    for round_ in range(5):
        results = await asyncio.gather(
            *(
                ledger.create_transaction(
                    c, operation="Debit", value=Decimal("0.01"), description="", request_id=f"{n}-{round_}"
                )
                for n, (ledger, order) in enumerate(((first, cards), (second, cards[::-1])))
                for c in order
            ),
            return_exceptions=True,
        )
        assert [r for r in results if isinstance(r, Exception)] == []
    assert [(await first.card(c)).balance for c in cards] == [1000 - 10] * 20


# ---- commands past their deadline ----------------------------------------------------------------

DEADLINE_S = 0.5
# An insert into events waits while another transaction holds this lock; reads go on.
HOLD_APPENDS = "lock table events in share row exclusive mode"


async def debits_on(pool, card_id: str) -> list[str]:
    rows = await pool.fetch(
        "select data->>'request_id' as request_id from events where stream_id = $1 and type like '%Debited'"
        " order by version",
        card_id,
    )
    return [row["request_id"] for row in rows]


def debit(ledger: Ledger, card_id: str, request_id: str):
    return ledger.create_transaction(
        card_id, operation="Debit", value=Decimal(1), description="", request_id=request_id
    )


@pytest.mark.single_server("locks the events table of one server")
async def test_commands_past_their_deadline_answer_at_once_and_a_queued_one_is_never_sent(pool, clock):
    cards = await funded_cards(Ledger(EventStore(pool), code_key=b"k" * 32, clock=clock), 2)
    bounded = Ledger(EventStore(pool), code_key=b"k" * 32, clock=clock, deadline_s=DEADLINE_S)
    loop = asyncio.get_running_loop()
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute(HOLD_APPENDS)
        started = loop.time()
        sent = asyncio.create_task(debit(bounded, cards[0], "sent"))
        await asyncio.sleep(0.1)  # its batch's statement is out, waiting for the lock
        queued = asyncio.create_task(debit(bounded, cards[1], "queued"))  # waits for the next batch
        results = await asyncio.gather(sent, queued, return_exceptions=True)
        answered_s = loop.time() - started
    assert [type(r) for r in results] == [CommandTimedOut, CommandTimedOut], results
    assert answered_s < DEADLINE_S + 0.3
    assert "same requestId" in str(results[0])

    # The lock is gone: the statement that was out commits (its outcome was unknown, not "not
    # applied"); the one still queued at its deadline never goes out, and the Debit sent after it
    # on the same card, through the same queue, is the only one there.
    await debit(bounded, cards[1], "after")
    assert await debits_on(pool, cards[0]) == ["sent"]
    assert await debits_on(pool, cards[1]) == ["after"]
    # Sent again with their requestIds, both are applied exactly once.
    again = [await debit(bounded, cards[0], "sent"), await debit(bounded, cards[1], "queued")]
    assert await debits_on(pool, cards[0]) == ["sent"]
    assert await debits_on(pool, cards[1]) == ["after", "queued"]
    assert [t.request_id for t in again] == ["sent", "queued"]
    assert [(await bounded.card(c)).balance for c in cards] == [900, 800]


@pytest.mark.single_server("locks the events table of one server")
async def test_a_connection_whose_commit_timed_out_is_closed_not_returned_to_the_pool(database_url, clock):
    pool = await create_pool(database_url, size_min=1, size_max=1, statement_timeout_s=DEADLINE_S)
    blocker = await asyncpg.connect(database_url)
    try:
        ledger = Ledger(EventStore(pool), code_key=b"k" * 32, clock=clock)
        [card] = await funded_cards(ledger, 1)
        backend_before = await pool.fetchval("select pg_backend_pid()")
        async with blocker.transaction():
            await blocker.execute(HOLD_APPENDS)
            with pytest.raises(CommandTimedOut):
                async with asyncio.timeout(DEADLINE_S * 4):  # a release waiting on the server would hang here
                    await debit(ledger, card, "timed-out")
        assert await pool.fetchval("select pg_backend_pid()") != backend_before
    finally:
        await blocker.close()
        await pool.close()


@pytest.mark.single_server("one server's append guard; a Citus shard's is checked apart (_GUARDS_HELD)")
async def test_the_append_guard_finds_a_stream_by_its_key_alone(database_url, store):
    """The group commit's guard (is the stream's event at the expected version the one with the
    previous hash, of the row's store?) finds that event by ``(stream_id, version)`` and nothing
    else. Taken out of the planner's reach (the index marked invalid, in a transaction rolled back),
    the key leaves the guard no index at all; where the store stood in the subquery's WHERE, the
    guard walked ``events_by_tenant`` instead, every event of the store, per appended row: a
    backend under load was seen ANDing that walk with the key's probe, a tenth of the Debits a
    second (docs/benchmarks.md, "The collapse again")."""
    statement = f"explain (format json) {_APPEND_EACH}"
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("set plan_cache_mode = force_generic_plan")
        usual = json.loads(await connection.fetchval(statement, "[]"))[0]["Plan"]
        hidden = connection.transaction()
        await hidden.start()
        await connection.execute(
            "update pg_index set indisvalid = false where indexrelid = 'events_stream_id_version_key'::regclass"
        )
        without_the_key = json.loads(await connection.fetchval(statement, "[]"))[0]["Plan"]
        await hidden.rollback()
    finally:
        await connection.close()

    assert indexes_used(usual) == {"events_stream_id_version_key"}
    assert indexes_used(without_the_key) == set()
