"""Losing the database primary: a synchronous standby is promoted and the service carries on.

A real primary and a real synchronous standby (tests/pg_cluster.py) on loopback ports; the hub
is a ``giftcard serve`` process given a multi-host URL with ``target_session_attrs=read-write``.
Under a load of Debits the primary's postmaster and children are SIGKILLed and the standby is
promoted with ``pg_ctl promote``: requests in flight answer 503 (never 500, never a hang), the
same process finds the new primary by itself, and every acknowledged Debit is on it exactly once.
The same under Patroni is in tests/test_patroni.py.

A commit in doubt is the harder case: the primary committed it locally, the synchronous standby
never got it, and the client was told 503. A card cached from the old primary holds that event; on
the new primary it never happened, and no decision may be taken as if it had.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from ledger.application.commands import Ledger
from ledger.domain.giftcard import DEBIT
from ledger.eventstore.store import EventStore
from ledger.postgres.database import create_pool
from ledger.postgres.migrate import upgrade
from projections import checkpoints
from tests.cards import issue
from tests.debit_load import Debit, RetryPolicy, plan_debits, send_all, until_acknowledged
from tests.hub_process import Answer, HubProcess, NativeClient
from tests.pg_cluster import ReplicatedPair, pg_binaries_missing
from tests.postgres_faults import create_database
from tests.test_faults import (
    LOAD_CREDIT,
    assert_every_debit_came_through,
    assert_ledger_consistent_at,
    assert_unavailable_answers_are_clear,
    credits_of,
    deadline_in,
    funded_cards,
    funded_load,
    send_during,
    summary,
)
from tests.test_webhooks import TEST_SECRET_KEY, receiving, subscribe

pytestmark = pytest.mark.skipif(pg_binaries_missing() is not None, reason=pg_binaries_missing() or "")

SCENARIO_TIMEOUT_S = 90
LOAD_TIMEOUT_S = 60
DATABASE = "giftcard"


@pytest.fixture
def pair() -> Iterator[ReplicatedPair]:
    cluster = ReplicatedPair()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


async def kill_primary_and_promote(pair: ReplicatedPair, debits, at_acknowledged: int, deadline: float) -> float:
    await until_acknowledged(debits, at_acknowledged, deadline)
    await asyncio.to_thread(pair.fail_over)
    return asyncio.get_running_loop().time()


async def replication_of(http: aiohttp.ClientSession, hub: HubProcess) -> dict:
    async with http.get(hub.base_url + "/readyz") as response:
        assert response.status == 200, await response.text()
        return (await response.json())["replication"]


async def projections_caught_up(url: str, timeout_s: float = 30.0) -> None:
    """The projection runner (a process of serve's own) follows the new primary without a restart."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        async with asyncio.timeout(timeout_s):
            while any(status.lag_events for status in await checkpoints.statuses(pool)):
                await asyncio.sleep(0.2)
    finally:
        await pool.close()


def db_status(url: str) -> dict:
    """``giftcard db status --json`` run as an operator would, with the multi-host URL."""
    completed = subprocess.run(
        [sys.executable, "-m", "hub.cli", "db", "status", "--json"],
        env={**os.environ, "GIFTCARD_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(completed.stdout)


async def test_primary_killed_mid_load_standby_promoted_nothing_acknowledged_lost(pair, http, tmp_path: Path):
    await create_database(pair.primary.url(), DATABASE)
    hub = HubProcess(pair.url(DATABASE), tmp_path / "hub.log")
    await hub.start()
    try:
        before = await replication_of(http, hub)
        assert before["synchronous"] is True and before["reason"] is None, before
        assert [(s["name"], s["state"], s["syncState"]) for s in before["standbys"]] == [("node2", "streaming", "sync")]
        assert "not synchronously replicated" not in hub.log_text()
        client = NativeClient(http, hub.base_url)
        cards, debits = await funded_load(client, 10, 400)
        await send_during(
            lambda deadline: kill_primary_and_promote(pair, debits, at_acknowledged=150, deadline=deadline),
            [client],
            debits,
            concurrency=16,
            scenario_timeout_s=SCENARIO_TIMEOUT_S,
            load_timeout_s=LOAD_TIMEOUT_S,
        )
        print(summary(debits), {d.code for d in debits if d.code})
        assert_every_debit_came_through(debits)
        assert_unavailable_answers_are_clear(debits)
        assert hub.starts == 1 and hub.process.returncode is None
        await assert_ledger_consistent_at(pair.standby.url(DATABASE), client, debits, credits_of(cards, LOAD_CREDIT))
        await projections_caught_up(pair.standby.url(DATABASE))
        # Promoted alone, the new primary acknowledges commits no standby holds: both say so.
        after = await replication_of(http, hub)
        assert after["synchronous"] is False and after["standbys"] == [], after
        status = await asyncio.to_thread(db_status, pair.url(DATABASE))
        assert status["synchronous"] is False and "synchronous_standby_names is empty" in status["reason"]
    finally:
        await hub.stop()
        print(hub.log_text()[-5000:])


# ---- a commit in doubt, and a cache from the lost primary -------------------------------------

IN_DOUBT_TIMEOUT_S = 1.0


async def ledger_on(pair: ReplicatedPair) -> tuple[Ledger, asyncpg.Pool]:
    await create_database(pair.primary.url(), DATABASE)
    pool = await create_pool(pair.url(DATABASE), size_min=1, size_max=4, statement_timeout_s=IN_DOUBT_TIMEOUT_S)
    async with pool.acquire() as connection:
        await upgrade(connection)
    return Ledger(EventStore(pool), code_key=b"k" * 32), pool


async def debit(ledger: Ledger, card_id: str, value: str, request_id: str):
    return await ledger.create_transaction(
        card_id, operation=DEBIT, value=Decimal(value), description="", request_id=request_id
    )


async def commit_in_doubt(ledger: Ledger, card_id: str) -> None:
    """A Debit of 30 that the primary commits locally while its synchronous standby is down: the
    client stops waiting for the standby's acknowledgement, so it cannot know the outcome."""
    with pytest.raises(TimeoutError):
        await debit(ledger, card_id, "30", "in-doubt")


async def funded_card(ledger: Ledger) -> str:
    card_id = str((await issue(ledger)).card.id)
    await ledger.create_transaction(card_id, operation="Credit", value=Decimal(100), description="", request_id="c")
    return card_id


async def debits_on(pool: asyncpg.Pool, card_id: str) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        "select data->>'request_id' as request_id, data->>'transaction_id' as id from events"
        " where stream_id = $1 and type like '%Debited' order by version",
        card_id,
    )
    return [(row["request_id"], row["id"]) for row in rows]


async def promote_without_the_lost_commits(pair: ReplicatedPair) -> None:
    await asyncio.to_thread(pair.primary.kill)
    await asyncio.to_thread(pair.standby.start)
    await asyncio.to_thread(pair.fail_over)


async def test_a_card_cached_from_the_lost_primary_is_not_trusted_on_the_new_one(pair):
    ledger, pool = await ledger_on(pair)
    try:
        retried_card, refused_card = await funded_card(ledger), await funded_card(ledger)
        await asyncio.to_thread(pair.standby.stop, "fast")
        for card_id in (retried_card, refused_card):
            await commit_in_doubt(ledger, card_id)
            # Another request reads the card on the old primary: the locally committed Debit shows.
            assert (await ledger.card(card_id)).balance == 7000
        await promote_without_the_lost_commits(pair)

        # The client's retry: the cache would say "already applied"; the new primary never saw it.
        retried = await debit(ledger, retried_card, "30", "in-doubt")
        assert await debits_on(pool, retried_card) == [("in-doubt", retried.id)]
        # A Debit the cached balance (70) would refuse and the real one (100) accepts.
        accepted = await debit(ledger, refused_card, "80", "more-than-the-cache-has")
        assert await debits_on(pool, refused_card) == [("more-than-the-cache-has", accepted.id)]
        assert [(await ledger.card(c)).balance for c in (retried_card, refused_card)] == [7000, 2000]
    finally:
        await pool.close()


async def test_start_warns_and_readyz_says_when_commits_are_not_synchronously_replicated(start_service, caplog):
    """The test server has no standby: an operator is told at start, and by /readyz."""
    with caplog.at_level("WARNING", logger="hub.app"):
        service = await start_service()
    assert any("not synchronously replicated" in r.getMessage() for r in caplog.records), caplog.text
    status, body, _ = await service.call("GET", "/readyz")
    assert status == 200 and body["replication"]["synchronous"] is False, body
    assert body["replication"]["reason"], body


async def debit_until_answered(client: NativeClient, card_id: str, request_id: str, timeout_s: float = 30.0) -> str:
    async with asyncio.timeout(timeout_s):
        while True:
            answer = await client.transaction(card_id, "Debit", Decimal("1.00"), request_id, timeout_s=10)
            if answer.status == 200:
                return answer.body["id"]
            assert answer.status == 503, answer
            await asyncio.sleep(0.1)


async def test_hold_sweeper_and_webhook_deliverer_follow_the_new_primary(pair, http, tmp_path: Path):
    """serve's background work (hold expiry, webhooks) reconnects to the promoted standby by itself."""
    await create_database(pair.primary.url(), DATABASE)
    env = {
        "GIFTCARD_HOLD_TTL": "1s",
        "GIFTCARD_HOLD_SWEEP_INTERVAL_S": "0.2",
        "GIFTCARD_SECRET_KEY": TEST_SECRET_KEY,
        "GIFTCARD_PROVIDER_ALLOWLIST": "127.0.0.0/8",
        "GIFTCARD_WEBHOOK_BACKOFF_BASE_S": "0.05",
        "GIFTCARD_WEBHOOK_BACKOFF_MAX_S": "0.5",
    }
    hub = HubProcess(pair.url(DATABASE), tmp_path / "hub.log", env=env)
    await hub.start()
    primary = await asyncpg.create_pool(pair.primary.url(DATABASE), min_size=1, max_size=1)
    try:
        async with receiving() as receiver:
            await subscribe(primary, receiver, ["card.debited", "card.voided"])
            await primary.close()
            client = NativeClient(http, hub.base_url)
            (card_id,) = await funded_cards(client, 1, Decimal("10.00"))
            await asyncio.to_thread(pair.fail_over)
            transaction_id = await debit_until_answered(client, card_id, "after-failover")

            promoted = await asyncpg.create_pool(pair.standby.url(DATABASE), min_size=1, max_size=1)
            try:
                async with asyncio.timeout(30):
                    while not await promoted.fetchval(
                        "select count(*) from events where stream_id = $1 and type like '%Voided'", card_id
                    ):
                        await asyncio.sleep(0.2)
                    delivered = set()
                    while {("card.debited", transaction_id), ("card.voided", transaction_id)} - delivered:
                        delivered = {
                            (r.payload["type"], r.payload["data"].get("transactionId")) for r in receiver.accepted
                        }
                        await asyncio.sleep(0.2)
            finally:
                await promoted.close()
    finally:
        await hub.stop()


# ---- commits that cannot finish: every request answered within its deadline ---------------------

REQUEST_DEADLINE_S = 2.0  # GIFTCARD_STATEMENT_TIMEOUT_S of the hub under test, short to keep the test fast
ANSWER_SLACK_S = 1.0


async def timed_debit(client: NativeClient, debit: Debit) -> tuple[float, Answer]:
    started = asyncio.get_running_loop().time()
    answer = await client.transaction(debit.card_id, "Debit", debit.value, debit.request_id, timeout_s=60)
    return asyncio.get_running_loop().time() - started, answer


async def test_with_the_synchronous_standby_stopped_every_debit_is_answered_503_within_its_deadline(
    pair, http, tmp_path: Path
):
    """Half the Debits queue on one card's lock, half on the group commit's queue behind a commit
    that waits for the standby: each is answered by its deadline, and once the standby is back each
    one sent again with its requestId is applied exactly once."""
    await create_database(pair.primary.url(), DATABASE)
    env = {"GIFTCARD_STATEMENT_TIMEOUT_S": str(REQUEST_DEADLINE_S)}
    hub = HubProcess(pair.url(DATABASE), tmp_path / "hub.log", env=env)
    await hub.start()
    try:
        client = NativeClient(http, hub.base_url)
        cards = await funded_cards(client, 9, LOAD_CREDIT)
        one_card = plan_debits(cards[:1], 8, [Decimal("1.00")])
        many_cards = plan_debits(cards[1:], 8, [Decimal("2.00")])
        debits = [*one_card, *many_cards]
        await asyncio.to_thread(pair.standby.stop, "fast")

        answers = await asyncio.gather(*(timed_debit(client, debit) for debit in debits))
        slowest_s = max(elapsed for elapsed, _ in answers)
        print(f"slowest of {len(debits)} answers while the standby was stopped: {slowest_s:.2f} s")
        assert [answer.status for _, answer in answers] == [503] * len(debits), answers
        for debit, (_, answer) in zip(debits, answers, strict=True):
            debit.unavailable_answers.append(answer)
        assert_unavailable_answers_are_clear(debits)
        assert all("same requestId" in answer.body["error"]["message"] for _, answer in answers)
        assert slowest_s <= REQUEST_DEADLINE_S + ANSWER_SLACK_S

        await asyncio.to_thread(pair.standby.start)
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            await send_all([client], debits, concurrency=16, policy=RetryPolicy(), deadline=deadline_in(LOAD_TIMEOUT_S))
        assert_every_debit_came_through(debits)
        await assert_ledger_consistent_at(pair.primary.url(DATABASE), client, debits, credits_of(cards, LOAD_CREDIT))
        assert "unexpected error" not in hub.log_text()
    finally:
        await hub.stop()
