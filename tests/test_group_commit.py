"""Group commit: concurrent commands on different cards share statements and commits, and each
is still judged alone: a lost race or a bad request fails only its own command."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from ledger.commands import Ledger
from ledger.domain import errors
from ledger.store import EventStore, verify_chain
from tests.cards import count_events, issue

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
