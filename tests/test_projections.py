"""Projections: exactly once under SIGKILL and with two runners side by side (real OS processes),
rebuild while the service runs, and the read models over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from hub.cli import build_parser
from ledger.application.commands import IssueCard, Ledger
from ledger.eventstore.codec import canonical_json
from ledger.eventstore.commit_order import START
from ledger.eventstore.store import EventStore, NewEvent, RecordedEvent
from projections import checkpoints, names, read_model, read_models
from projections.events import SETTLED
from projections.projection import ProjectionBug
from projections.rebuild import rebuild
from projections.runner import ProjectionRunner, SharedRead
from tests.cards import load_and_order
from tests.conftest import Clock
from tests.projection_worker import PROBE, PROBE_TABLE_SQL, Probe
from tests.providers.reference import start_reference_provider
from tests.test_hub import register

pytestmark = pytest.mark.also_on_citus

NATIVE = "VtexGiftCard"
READ_MODEL_TABLES = [table for projection in read_models(NATIVE) for table in projection.tables]
EVENTS_PER_CARD = 6
WAIT_S = 30.0


# ---- helpers ---------------------------------------------------------------------------------


async def write_cards(ledger: Ledger, clock: Clock, count: int, tag: str) -> list[str]:
    """``count`` cards, each: issued, loaded 100, debited 30.5, settled 20, then part of both cancelled.

    Balance 100 - 30.5 + 15 - 5 = 79.5; the Debit's cancellation of 15 releases 10.5 and refunds 4.5.
    """

    async def one(n: int) -> str:
        issued = await ledger.issue(
            IssueCard(
                relation_name=f"{tag}-{n}",
                caption="c",
                profile_id=f"{tag}-{n}@example.com",
                currency="USD",
                expiring_date=clock.now + timedelta(days=365),
            )
        )
        card_id = str(issued.card.id)
        credit, debit = await load_and_order(ledger, card_id, f"order-{tag}-{n}")
        await ledger.settle(card_id, debit.id, value=Decimal(20), request_id="s1")
        await ledger.cancel(card_id, debit.id, value=Decimal(15), request_id="c1")
        await ledger.cancel(card_id, credit.id, value=Decimal(5), request_id="c2")
        return card_id

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def all_caught_up(pool: asyncpg.Pool, projection_names: list[str]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        total = await pool.fetchval("select count(*) from events")
        applied = await pool.fetch(
            "select events_applied from projection_checkpoints where name = any($1)", projection_names
        )
        return len(applied) == len(projection_names) and all(r["events_applied"] == total for r in applied)

    return check


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Every read model table's rows, in a stable order."""
    return {
        t: [r[0] for r in await pool.fetch(f"select x::text from {t} x order by x::text")] for t in READ_MODEL_TABLES
    }


async def rebuilt_from_scratch(pool: asyncpg.Pool) -> dict[str, list[str]]:
    for projection in read_models(NATIVE):
        await rebuild(pool, projection, batch_events_max=97)
    return await snapshot(pool)


async def assert_balances_match_the_ledger(pool: asyncpg.Pool, ledger: Ledger, card_ids: list[str]) -> None:
    projected = dict(await pool.fetch("select card_id, available from read_card_balances"))
    assert len(projected) == len(card_ids)
    for card_id in card_ids:
        assert projected[card_id] == (await ledger.card(card_id)).balance


async def assert_probe_applied_each_event_once(pool: asyncpg.Pool) -> set[str]:
    """Every event up to the probe's checkpoint is in the probe table exactly once, and nothing past it."""
    expected = await pool.fetch(
        """
        select e.position from events e, projection_checkpoints c
        where c.name = $1 and e.seq <= coalesce((c.checkpoint ->> e.source::text)::bigint, 0) order by e.position
        """,
        PROBE,
    )
    applied = await pool.fetch("select position from projection_probe order by position")
    assert [r["position"] for r in applied] == [r["position"] for r in expected]
    assert await pool.fetchval("select events_applied from projection_checkpoints where name = $1", PROBE) == len(
        expected
    )
    return {r["runner"] for r in await pool.fetch("select distinct runner from projection_probe")}


async def start_worker(database_url: str, runner_name: str, *options: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.projection_worker",
        database_url,
        runner_name,
        *options,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
    _, stderr = await process.communicate()
    assert b"Traceback" not in stderr, stderr.decode()[-3000:]


def open_batch_of(pool: asyncpg.Pool, runner_name: str) -> Callable[[], Awaitable[bool]]:
    """True while the runner's connection is inside a transaction that has written (has an xid)."""

    async def check() -> bool:
        return await pool.fetchval(
            """
            select exists (select 1 from pg_stat_activity
                           where application_name = $1 and state = 'idle in transaction' and backend_xid is not null)
            """,
            runner_name,
        )

    return check


async def probe_applied(pool: asyncpg.Pool) -> int:
    return await pool.fetchval("select events_applied from projection_checkpoints where name = $1", PROBE) or 0


def probe_advanced(pool: asyncpg.Pool, before: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await probe_applied(pool) > before

    return check


def gone(pool: asyncpg.Pool, runner_name: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not await pool.fetchval(
            "select exists (select 1 from pg_stat_activity where application_name = $1)", runner_name
        )

    return check


# ---- exactly once -------------------------------------------------------------------------------


async def test_a_runner_killed_mid_batch_resumes_exactly_once(pool, ledger, clock, database_url):
    await pool.execute(PROBE_TABLE_SQL)
    card_ids = await write_cards(ledger, clock, 60, "crash")
    total = len(card_ids) * EVENTS_PER_CARD
    every = [*names(), PROBE]

    for kill in range(3):
        applied_before = await probe_applied(pool)
        victim = await start_worker(database_url, f"victim{kill}", "--batch-events-max", "25", "--delay-s", "0.05")
        await wait_for(probe_advanced(pool, applied_before), "the runner to commit a probe batch")
        await wait_for(open_batch_of(pool, f"victim{kill}"), "a batch in progress")
        victim.send_signal(signal.SIGKILL)  # no cleanup, no rollback from the client: the server aborts it
        await victim.wait()
        await wait_for(gone(pool, f"victim{kill}"), "the killed runner's connection to close")
        await assert_probe_applied_each_event_once(pool)
    assert 0 < await probe_applied(pool) < total, "the kills landed mid-run"

    survivor = await start_worker(database_url, "survivor", "--batch-events-max", "50")
    try:
        await wait_for(all_caught_up(pool, every), "the restarted runner to catch up")
    finally:
        await stop(survivor)
    await assert_probe_applied_each_event_once(pool)
    assert await pool.fetchval("select count(*) from projection_probe") == total

    after_crashes = await snapshot(pool)
    assert await rebuilt_from_scratch(pool) == after_crashes, "read models equal a replay from zero"
    await assert_balances_match_the_ledger(pool, ledger, card_ids)


async def test_two_runners_side_by_side_apply_every_event_exactly_once(pool, ledger, clock, database_url):
    await pool.execute(PROBE_TABLE_SQL)
    card_ids = await write_cards(ledger, clock, 50, "before")
    options = ("--batch-events-max", "10", "--delay-s", "0.01", "--poll-interval-s", "0.01")
    runners = [await start_worker(database_url, name, *options) for name in ("A", "B")]
    try:
        card_ids += await write_cards(ledger, clock, 50, "during")  # events keep arriving while they run
        await wait_for(all_caught_up(pool, [*names(), PROBE]), "both runners to catch up")
    finally:
        for runner in runners:
            await stop(runner)

    assert await assert_probe_applied_each_event_once(pool) == {"A", "B"}, "both runners took batches"
    assert await pool.fetchval("select count(*) from projection_probe") == len(card_ids) * EVENTS_PER_CARD
    side_by_side = await snapshot(pool)
    assert await rebuilt_from_scratch(pool) == side_by_side
    await assert_balances_match_the_ledger(pool, ledger, card_ids)


async def test_runners_miss_no_event_of_writers_whose_commits_land_out_of_order(pool, database_url):
    """Three writer processes hold each append's transaction open a random while, so commits land in
    another order than inserts, in every lane; two runner processes follow meanwhile."""
    await pool.execute(PROBE_TABLE_SQL)
    options = ("--batch-events-max", "7", "--delay-s", "0", "--poll-interval-s", "0.005")
    runners = [await start_worker(database_url, name, *options) for name in ("A", "B")]
    try:
        writers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.append_worker",
                database_url,
                f"w{n}",
                "150",
                stderr=asyncio.subprocess.PIPE,
            )
            for n in range(3)
        ]
        for writer in writers:
            _, stderr = await writer.communicate()
            assert writer.returncode == 0, stderr.decode()[-3000:]
        await wait_for(all_caught_up(pool, [PROBE]), "both runners to catch up")
    finally:
        for runner in runners:
            await stop(runner)
    assert await assert_probe_applied_each_event_once(pool) == {"A", "B"}
    assert await pool.fetchval("select count(*) from projection_probe") == 450


async def test_a_checkpoint_moved_by_another_batch_rolls_this_one_back(pool, ledger, clock):
    """The second wall behind the lock: a batch started from a stale checkpoint cannot commit."""
    await write_cards(ledger, clock, 1, "cas")
    runner = ProjectionRunner(pool, read_models(NATIVE))
    await runner.prepare()
    async with pool.acquire() as connection:
        stale = await checkpoints.load(connection, "card_balances")
    assert await runner.run_batch(read_model("card_balances", NATIVE)) == EVENTS_PER_CARD
    events = await EventStore(pool).read_all(stale)
    async with pool.acquire() as connection:
        with pytest.raises(checkpoints.CheckpointMoved):
            async with connection.transaction():
                await checkpoints.advance(connection, "card_balances", stale, events)


async def test_an_event_a_projection_cannot_place_stops_that_projection_just_before_it(pool, ledger, clock, store):
    [card_id] = await write_cards(ledger, clock, 1, "ok")
    # A settlement of a transaction the card never had: balances and history cannot place it,
    # daily totals only needs the card's currency.
    last = (await store.read_stream(card_id))[-1]
    bad = canonical_json(
        json.dumps(
            {"transaction_id": "nope", "oid": "o", "value": 1, "date": "2026-01-15T12:00:00+00:00", "request_id": "r"}
        )
    )
    await store.append(card_id, last.version, [NewEvent(SETTLED, bad)], previous_hash=last.hash)
    await write_cards(ledger, clock, 1, "after")
    runner = ProjectionRunner(pool, read_models(NATIVE), failure_backoff_s=0.0)
    await runner.prepare()
    for _ in range(30):  # each failure halves the batch, down to the one event that fails
        await runner.run_round()

    in_order = await store.read_all(limit=1000)
    before_it = next(n for n, e in enumerate(in_order) if b"nope" in e.data)  # in the order batches follow
    status = {s.name: s for s in await checkpoints.statuses(pool)}
    for stopped in ("card_balances", "transaction_history"):
        assert status[stopped].events_applied == before_it, "stopped just before the event"
        assert status[stopped].checkpoint == START.past(in_order[:before_it])
        assert status[stopped].lag_events == len(in_order) - before_it, "and says how far behind it is"
    assert status["daily_totals"].lag_events == 0
    issued_before = {e.stream_id for e in in_order[:before_it] if e.version == 1}  # another lane's card may be
    assert await pool.fetchval("select count(*) from read_card_balances") == len(issued_before)


async def test_daily_totals_reads_a_cards_currency_once_per_runner(pool, ledger, clock, store):
    """A card's currency never changes: after its first batch, the projection no longer asks
    read_daily_totals_cards for it (here the row is gone, and a later batch still finds it);
    a projection that never met the card does ask, and stops at the card it cannot place."""
    [card_id] = await write_cards(ledger, clock, 1, "currency")
    remembering = read_model("daily_totals", NATIVE)
    first = await store.read_all(limit=1000)
    async with pool.acquire() as connection, connection.transaction():
        await remembering.apply(connection, first)
    await pool.execute("delete from read_daily_totals_cards where card_id = $1", card_id)

    await ledger.create_transaction(card_id, operation="Debit", value=Decimal(1), description="", request_id="again")
    later = [e for e in await store.read_all(limit=1000) if e.position > first[-1].position]
    async with pool.acquire() as connection, connection.transaction():
        await remembering.apply(connection, later)
    assert await pool.fetchval("select sum(redeemed) from read_daily_totals") == 3050 + 100

    async with pool.acquire() as connection, connection.transaction():
        with pytest.raises(ProjectionBug, match="no such card"):
            await read_model("daily_totals", NATIVE).apply(connection, later)


class Flaky(Probe):
    """A probe whose batches fail while they hold the event at ``fails_at`` (then it is fixed)."""

    def __init__(self, name: str, fails_at: int) -> None:
        super().__init__(name, name)
        self.fails_at: int | None = fails_at

    async def apply(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        if any(event.position == self.fails_at for event in events):
            raise ProjectionBug(f"{self.name} cannot place event {self.fails_at}")
        await super().apply(connection, events)


async def assert_each_event_once(pool: asyncpg.Pool, probe_name: str) -> int:
    """The probe was given every event up to its checkpoint once, and nothing past it."""
    expected = await pool.fetch(
        """
        select e.position from events e, projection_checkpoints c
        where c.name = $1 and e.seq <= coalesce((c.checkpoint ->> e.source::text)::bigint, 0) order by e.position
        """,
        probe_name,
    )
    applied = await pool.fetch("select position from projection_probe where runner = $1 order by position", probe_name)
    assert [r["position"] for r in applied] == [r["position"] for r in expected]
    return len(expected)


def count_reads(runner: ProjectionRunner) -> dict[str, int]:
    """Counts the runner's reads of the events: shared by a round's projections, or one batch's own."""
    counts = {"shared": 0, "own": 0}
    read_all = runner.store.read_all

    async def counted(after, limit, *, connection=None):
        counts["shared" if connection is None else "own"] += 1
        return await read_all(after, limit, connection=connection)

    runner.store.read_all = counted
    return counts


async def test_projections_at_different_checkpoints_share_reads_and_each_get_every_event_once(pool, ledger, clock):
    await pool.execute(PROBE_TABLE_SQL)
    await write_cards(ledger, clock, 10, "shared")
    total = 10 * EVENTS_PER_CARD
    probes = [Probe(name, name) for name in ("ahead", "behind", "zero_a", "zero_b")]
    for probe, batch in ((probes[0], 13), (probes[1], 7)):  # two of them start elsewhere
        alone = ProjectionRunner(pool, [probe])
        await alone.prepare()
        assert await alone.run_batch(probe, batch) == batch

    batches: list[str] = []
    runner = ProjectionRunner(pool, probes, batch_events_max=10, on_batch=lambda name, _: batches.append(name))
    reads = count_reads(runner)
    await runner.catch_up()

    for probe in probes:
        assert await assert_each_event_once(pool, probe.name) == total, probe.name
    assert reads["own"] == 0, "every batch used the round's read: no other runner moved a checkpoint"
    assert reads["shared"] < len(batches), "projections standing at the same checkpoint read the events once"


async def test_a_runner_applies_a_steady_trickle_in_a_few_batches_and_a_backlog_at_once(pool, ledger, clock):
    """A round that caught up waits out the rest of its interval, so that events written one by one
    are applied a batch per interval, not a batch per write; a runner that is behind goes on at once."""
    await pool.execute(PROBE_TABLE_SQL)
    probe = Probe(PROBE, PROBE)
    batches: list[int] = []
    runner = ProjectionRunner(
        pool, [probe], poll_interval_s=0.01, round_interval_s=0.5, on_batch=lambda _, count: batches.append(count)
    )
    running = asyncio.create_task(runner.run_forever())
    try:
        began = time.monotonic()
        [card_id] = await write_cards(ledger, clock, 1, "trickle")
        for n in range(30):
            await ledger.create_transaction(
                card_id, operation="Credit", value=Decimal(1), description="d", request_id=f"t{n}"
            )
            await asyncio.sleep(0.02)
        written = time.monotonic() - began
        await wait_for(all_caught_up(pool, [PROBE]), "the trickle applied")
    finally:
        await stopped(running)
    assert sum(batches) == EVENTS_PER_CARD + 30
    assert len(batches) <= written / 0.5 + 2, (written, batches)  # without the interval: about one per write

    await write_cards(ledger, clock, 4, "backlog")
    behind = ProjectionRunner(pool, [probe], batch_events_max=5, round_interval_s=60.0)
    running = asyncio.create_task(behind.run_forever())
    try:
        await wait_for(all_caught_up(pool, [PROBE]), "the backlog applied", timeout_s=20.0)  # full batches: no waiting
    finally:
        await stopped(running)
    assert await assert_each_event_once(pool, PROBE) == 5 * EVENTS_PER_CARD + 30


async def stopped(task: asyncio.Task) -> None:
    """Cancels ``task`` and waits until it has stopped (a batch it was applying rolls back)."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_shared_read_whose_checkpoint_moved_meanwhile_is_not_applied(pool, ledger, clock):
    """Another runner applied a batch between this round's read and its lock: the batch reads again."""
    await pool.execute(PROBE_TABLE_SQL)
    await write_cards(ledger, clock, 2, "moved")
    probe = Probe(PROBE, PROBE)
    runner = ProjectionRunner(pool, [probe])
    await runner.prepare()
    stale = SharedRead(START, await runner.store.read_all(START, 100))
    assert await ProjectionRunner(pool, [probe]).run_batch(probe, 5) == 5  # the other runner

    assert await runner.run_batch(probe, 100, stale) == 2 * EVENTS_PER_CARD - 5
    assert await assert_each_event_once(pool, PROBE) == 2 * EVENTS_PER_CARD


async def test_a_projection_failing_on_a_shared_batch_does_not_hold_back_the_others(pool, ledger, clock):
    await pool.execute(PROBE_TABLE_SQL)
    await write_cards(ledger, clock, 5, "flaky")
    total = 5 * EVENTS_PER_CARD
    fails_at = await pool.fetchval("select position from events order by seq, source offset 11 limit 1")  # read order
    flaky = Flaky("flaky", fails_at)
    probes = [Probe(name, name) for name in ("steady_a", "steady_b")]
    runner = ProjectionRunner(pool, [*probes, flaky], batch_events_max=8, failure_backoff_s=0.0)
    await runner.prepare()
    for _ in range(20):  # each failure halves the flaky batch, down to the event that fails
        await runner.run_round()

    for probe in probes:
        assert await assert_each_event_once(pool, probe.name) == total
    assert await assert_each_event_once(pool, flaky.name) == 11, "stopped just before the event it cannot place"
    flaky.fails_at = None  # fixed: it resumes there, and gets every event once
    await runner.catch_up()
    assert await assert_each_event_once(pool, flaky.name) == total


# ---- rebuild while the service runs ---------------------------------------------------------------


async def test_rebuild_while_the_service_runs(start_service, pool, database_url):
    service = await start_service()
    card_ids = [await create_native_card(service, f"live-{n}", load=50) for n in range(5)]
    await wait_for(service_caught_up(service), "the service's runner")
    await pool.execute("update read_card_balances set relation_name = 'corrupted'")  # a bug to repair
    await pool.execute("delete from read_card_balances where card_id = $1", card_ids[0])

    env = {**os.environ, "GIFTCARD_DATABASE_URL": database_url}
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "hub.cli", "projections", "rebuild", "card_balances", "--batch-events-max", "2"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    communicating = asyncio.ensure_future(cli.communicate())
    n = 0
    while not communicating.done():  # the service keeps writing and answering meanwhile
        card_ids.append(await create_native_card(service, f"during-{n}", load=7))
        status, body, _ = await service.call("GET", "/api/ledger/balances")
        assert status == 200 and "freshness" in body
        n += 1
    stdout, stderr = await communicating
    assert cli.returncode == 0, stderr.decode()[-3000:]
    assert n > 0, "the service wrote while the rebuild ran"
    assert b"rebuilt card_balances" in stdout
    assert b"rebuild card_balances" in stderr and b"event" in stderr, "a tqdm progress bar"

    await wait_for(service_caught_up(service), "the service's runner after the swap")
    status, body, headers = await service.call("GET", "/api/ledger/balances", headers={"REST-Range": "0-999"})
    listed = {item["cardId"]: item for item in body["items"]}
    assert (
        set(listed) == set(card_ids)
        and headers["REST-Content-Range"] == f"resources 0-{len(card_ids) - 1}/{len(card_ids)}"
    )
    assert all(item["relationName"] != "corrupted" for item in listed.values())
    for card_id in card_ids:
        card = (await service.call("GET", f"/api/giftcards/{card_id}"))[1]
        assert listed[card_id]["balance"] == card["balance"]
    projected = {s["name"]: s for s in (await service.call("GET", "/api/projections"))[1]["items"]}
    assert projected["card_balances"]["rebuiltAt"] is not None and not projected["card_balances"]["rebuilding"]


async def create_native_card(service, relation: str, *, load: int) -> str:
    status, card, _ = await service.call(
        "POST",
        "/api/giftcards",
        {"relationName": relation, "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"},
    )
    assert status == 200, card
    status, _, _ = await service.call(
        "POST", f"/api/giftcards/{card['id']}/transactions", {"operation": "Credit", "value": load, "requestId": "l"}
    )
    assert status == 200
    return card["id"]


def service_caught_up(service) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        status, body, _ = await service.call("GET", "/api/projections")
        return status == 200 and all(item["lagEvents"] == 0 for item in body["items"])

    return check


# ---- the read API -------------------------------------------------------------------------------


async def native_history(service, clock: Clock) -> dict[str, str]:
    """Two USD cards and a JPY one, over two days; returns their ids."""
    usd = await create_native_card(service, "usd-1", load=100)
    other = await create_native_card(service, "usd-2", load=40)
    tx = f"/api/giftcards/{usd}/transactions"
    status, debit, _ = await service.call(
        "POST", tx, {"operation": "Debit", "value": 30.5, "requestId": "d", "orderInfo": {"orderId": "order-7"}}
    )
    assert status == 200
    await service.call("POST", f"{tx}/{debit['id']}/settlements", {"value": 20, "requestId": "s"})
    await service.call("POST", f"{tx}/{debit['id']}/cancellations", {"value": 15, "requestId": "c"})
    clock.advance(timedelta(days=2))
    status, yen, _ = await service.call(
        "POST",
        "/api/giftcards",
        {
            "relationName": "jpy",
            "caption": "c",
            "profileId": "p",
            "expiringDate": "2030-01-01T00:00:00Z",
            "currencyCode": "JPY",
        },
    )
    await service.call(
        "POST", f"/api/giftcards/{yen['id']}/transactions", {"operation": "Credit", "value": 500, "requestId": "l"}
    )
    await service.call(
        "POST", f"/api/giftcards/{other}/transactions", {"operation": "Debit", "value": 10, "requestId": "d"}
    )
    return {"usd": usd, "other": other, "jpy": yen["id"], "debit": debit["id"]}


async def test_read_models_over_http(service, clock):
    ids = await native_history(service, clock)
    await wait_for(service_caught_up(service), "the service's runner")

    status, body, headers = await service.call("GET", "/api/ledger/balances")
    assert status == 200 and headers["REST-Content-Range"] == "resources 0-2/3"
    assert body["freshness"]["projection"] == "card_balances" and body["freshness"]["lagEvents"] == 0
    usd = (await service.call("GET", f"/api/ledger/balances/{ids['usd']}"))[1]
    assert {k: usd[k] for k in ("provider", "currency", "balance", "authorized", "settled", "credited", "debited")} == {
        "provider": NATIVE,
        "currency": "USD",
        "balance": 84.5,  # 100 - 30.5 + 15
        "authorized": 0,  # 30.5 - 20 settled - 10.5 released
        "settled": 15.5,  # 20 - 4.5 refunded
        "credited": 100,
        "debited": 15.5,
    }
    assert usd["status"] == "active" and "freshness" in usd
    assert (await service.call("GET", "/api/ledger/balances?currency=JPY"))[1]["items"][0]["balance"] == 500
    page = await service.call("GET", "/api/ledger/balances", headers={"REST-Range": "resources=1-1"})
    assert page[2]["REST-Content-Range"] == "resources 1-1/3" and len(page[1]["items"]) == 1
    status, error, _ = await service.call("GET", "/api/ledger/balances/no-such-card")
    assert status == 404 and error["error"]["code"] == "card_not_found"

    status, body, headers = await service.call("GET", f"/api/ledger/transactions?card={ids['usd']}")
    assert status == 200 and headers["REST-Content-Range"] == "resources 0-1/2"
    credit, debit = body["items"]
    assert (credit["operation"], credit["value"], credit["currency"]) == ("Credit", 100, "USD")
    assert debit["id"] == ids["debit"] and debit["orderId"] == "order-7" and debit["source"] == "ledger"
    assert [s["value"] for s in debit["settlements"]] == [20]
    assert [(c["value"], c["released"], c["refunded"]) for c in debit["cancellations"]] == [(15, 10.5, 4.5)]
    found = (await service.call("GET", "/api/ledger/transactions?orderId=order-7"))[1]["items"]
    assert [t["id"] for t in found] == [ids["debit"]]
    debits = (await service.call("GET", f"/api/ledger/transactions?operation=Debit&provider={NATIVE}"))[1]["items"]
    assert sorted(t["value"] for t in debits) == [10, 30.5]
    later = (await service.call("GET", "/api/ledger/transactions?since=2026-01-16T00:00:00Z"))[1]["items"]
    assert sorted((t["currency"], t["value"]) for t in later) == [("JPY", 500), ("USD", 10)]
    earlier = (await service.call("GET", "/api/ledger/transactions?until=2026-01-16T00:00:00Z"))[1]
    assert len(earlier["items"]) == 3 and earlier["freshness"]["projection"] == "transaction_history"

    status, body, _ = await service.call("GET", "/api/ledger/daily-totals?currency=USD")
    days = [
        (d["day"], d["cardsIssued"], d["loaded"], d["redeemed"], d["settled"], d["cancelled"], d["liability"])
        for d in body["items"]
    ]
    assert days == [
        ("2026-01-15", 2, 140, 30.5, 20, 15, 124.5),
        ("2026-01-16", 0, 0, 0, 0, 0, 124.5),  # a quiet day carries the liability over
        ("2026-01-17", 0, 0, 10, 0, 0, 114.5),
    ]
    yen_days = (await service.call("GET", "/api/ledger/daily-totals?currency=JPY&since=2026-01-17"))[1]["items"]
    assert [(d["day"], d["loaded"], d["liability"]) for d in yen_days] == [("2026-01-17", 500, 500)]
    status, body, headers = await service.call(
        "GET", "/api/ledger/daily-totals?until=2026-01-16", headers={"REST-Range": "0-0"}
    )
    assert headers["REST-Content-Range"] == "resources 0-0/2" and body["items"][0]["day"] == "2026-01-15"


@pytest.mark.parametrize(
    "query",
    [
        "/api/ledger/transactions?since=yesterday",
        "/api/ledger/transactions?operation=Refund",
        "/api/ledger/transactions?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
        "/api/ledger/transactions?card=",
        "/api/ledger/transactions?until=0001-01-01T00:00:00%2B14:00",
        "/api/ledger/balances?currency=XYZ",
        "/api/ledger/balances?status=frozen",
        "/api/ledger/daily-totals?since=2026-13-01",
    ],
)
async def test_bad_query_parameters_are_a_400_naming_them(service, query):
    status, body, _ = await service.call("GET", query)
    assert status == 400 and body["error"]["message"], body


async def test_listings_need_hub_credentials_and_a_valid_range(service):
    async with service.session.get(service.base_url + "/api/ledger/balances") as response:
        assert response.status == 401
    status, body, _ = await service.call("GET", "/api/ledger/transactions", headers={"REST-Range": "5-1"})
    assert status == 400 and "REST-Range" in body["error"]["message"]


async def test_forwarded_operations_appear_marked_with_their_provider(service, clock):
    async with start_reference_provider() as provider:
        status, _, _ = await register(service, "Acme", provider)
        assert status == 200
        voucher = provider.state.issue_card(balance="75.00")
        base = f"/api/giftcardproviders/Acme/giftcards/{voucher.id}/transactions"
        body = {
            "operation": "Debit",
            "value": 40.5,
            "requestId": "order-9",
            "redemptionCode": voucher.redemption_code,
            "redemptionToken": voucher.redemption_token,
        }
        status, debit, _ = await service.call("POST", base, body)
        assert status == 200
        assert (await service.call("POST", base, body))[0] == 200  # a replay: the provider answers the original
        await service.call("POST", f"{base}/{debit['id']}/settlements", {"value": 30, "requestId": "s"})
        await service.call("POST", f"{base}/{debit['id']}/cancellations", {"value": 10.5, "requestId": "c"})
        refused = {**body, "value": 1000, "requestId": "too-much"}
        assert (await service.call("POST", base, refused))[0] >= 400  # refused: moves nothing
    await wait_for(service_caught_up(service), "the service's runner")

    items = (await service.call("GET", "/api/ledger/transactions?provider=Acme"))[1]["items"]
    # once, though forwarded twice; joined with its settlements by the provider's transaction id
    assert [
        (t["provider"], t["source"], t["id"], t["value"], t["currency"], t["operation"], t["settled"], t["cancelled"])
        for t in items
    ] == [("Acme", "forwarded", debit["id"], 40.5, None, "Debit", 30, 10.5)]
    assert [c["value"] for c in items[0]["cancellations"]] == [10.5]

    [day] = (await service.call("GET", "/api/ledger/daily-totals?provider=Acme"))[1]["items"]
    assert (
        day["currency"],
        day["transactions"],
        day["redeemed"],
        day["unclassified"],
        day["settled"],
        day["cancelled"],
    ) == (None, 1, 40.5, 0, 30, 10.5)  # the currency of an external provider's card is its own
    assert day["liability"] is None, "an external provider's balances are its own"
    assert (await service.call("GET", f"/api/ledger/transactions?provider={NATIVE}"))[1]["items"] == []


async def test_forwarded_calls_that_did_not_succeed_move_nothing(pool, store):
    for outcome in ("ok", "timeout", "refused", "error", "circuit_open"):
        data = {
            "operation": "CreateGiftCardTransactionSettlement",
            "providerId": "Acme",
            "cardId": "7",
            "transactionId": "t1",
            "value": "2.5",
            "requestId": outcome,
            "outcome": outcome,
            "httpStatus": None,
            "latencyMs": 1.0,
        }
        await store.append(
            f"forwarded-{outcome}", 0, [NewEvent("ProviderCallForwarded", canonical_json(json.dumps(data)))]
        )
    await ProjectionRunner(pool, read_models(NATIVE)).catch_up()
    assert await pool.fetchval("select settled from read_daily_totals where provider = 'Acme'") == 25000  # 10^-4 units
    assert await pool.fetchval("select count(*) from read_transaction_operations") == 1


# ---- the command line ---------------------------------------------------------------------------


async def test_cli_run_once_and_status(pool, ledger, clock, database_url):
    await write_cards(ledger, clock, 3, "cli")
    env = {**os.environ, "GIFTCARD_DATABASE_URL": database_url}

    async def giftcard(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hub.cli",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()[-3000:]
        return stdout.decode()

    before = await giftcard("projections", "status")
    assert all(name in before for name in names()) and " 18 " in before  # 18 events behind
    assert "caught up: 54 event(s) applied" in await giftcard("projections", "run", "--once")
    status = await giftcard("projections", "status", "--json")
    assert status.count('"lagEvents": 0') == 3 and status.count('"eventsApplied": 18') == 3


@pytest.mark.parametrize("option", ["--poll-interval-s", "--round-interval-s"])
@pytest.mark.parametrize("value", ["-1", "61", "soon"])
def test_cli_run_refuses_an_interval_it_cannot_keep(option, value, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["projections", "run", option, value])
    assert exited.value.code == 2 and option in capsys.readouterr().err


async def test_cli_status_fails_a_healthcheck_while_projections_lag(pool, ledger, clock, database_url):
    """``projections status --max-lag-s`` is the compose file's healthcheck of the projection worker."""
    await write_cards(ledger, clock, 1, "health")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIFTCARD_")}
    env["GIFTCARD_DATABASE_URL"] = database_url

    async def status(max_lag_s: str) -> tuple[int | None, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hub.cli", "projections", "status", "--max-lag-s", max_lag_s, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, stderr.decode()

    await asyncio.sleep(1.1)
    code, stderr = await status("1")
    assert code == 1, stderr
    assert all(f"{name} is " in stderr and "behind (more than 1 s)" in stderr for name in names()), stderr
    assert (await status("3600"))[0] == 0, "a lag under the bound is healthy"
    await ProjectionRunner(pool, read_models(NATIVE)).catch_up()
    assert await status("1") == (0, "")
