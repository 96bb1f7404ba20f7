"""The ledger sharded by card on a real Citus cluster: a coordinator and two workers on loopback.

``upgrade`` (what ``giftcard db upgrade`` and ``serve`` run) distributes the event table by card
and co-locates the snapshots with it; every card command is then a local transaction on one
shard, which the coordinator's record of two-phase commits (``pg_dist_transaction``) shows.
Events stay immutable on every shard placement, also when a worker is written to directly. Under
concurrent Debits from ``giftcard serve`` nothing is spent twice; with a worker down, its cards
answer 503 while the other worker's cards keep working, and they catch up when it returns.

Two stores on the cluster stay apart on the workers (row-level security there, the scope taken
along: see ledger.postgres.tenancy); a large store's cards spread over every worker, and shards
holding them move under its Debits with nothing lost, doubled or crossed into the other store.

The read side follows each shard's own commit order (ledger.eventstore.commit_order): every shard is a
source whose events take an increasing seq on their worker, so projections run beside ``serve`` on
the cluster, keep up through shard moves, and are held back by no other node's transactions.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from hub.http import auth
from ledger.application.bulk_issue import BatchDefaults, BatchRequest, BulkIssuer
from ledger.application.commands import Ledger
from ledger.domain.giftcard import DEBIT
from ledger.eventstore.codec import canonical_json
from ledger.eventstore.commit_order import Checkpoint
from ledger.eventstore.store import EventStore, NewEvent, OneEvent, RecordedEvent, chain_hash, verify_chain
from ledger.postgres import distribution
from ledger.postgres.database import create_pool
from ledger.postgres.migrate import grant_service_role, upgrade
from ledger.postgres.tenancy import DEFAULT_TENANT, tenant_scope
from projections import checkpoints
from projections.models import card_balances
from tests.cards import issue
from tests.citus_cluster import CitusCluster, citus_missing
from tests.debit_load import RetryPolicy, acknowledged_count, send_all, until_acknowledged
from tests.giftcard_cli import giftcard
from tests.hub_process import HubProcess, NativeClient
from tests.test_faults import (
    LOAD_CREDIT,
    assert_ledger_consistent,
    credits_of,
    deadline_in,
    funded_cards,
    funded_load,
    summary,
)

# On a cluster of its own, with or without --on-citus (which then runs it beside the suites it puts on Citus).
pytestmark = [
    pytest.mark.skipif(citus_missing() is not None, reason=str(citus_missing())),
    pytest.mark.also_on_citus,
]

SCENARIO_TIMEOUT_S = 90
# The hub on the coordinator with its read side: the projection runner follows every shard.
HUB_ENV = {"GIFTCARD_RUN_PROJECTIONS": "true"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[CitusCluster]:
    started = CitusCluster()
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.fixture(scope="module")
async def upgraded(cluster: CitusCluster) -> list[str]:
    connection = await asyncpg.connect(cluster.url())
    try:
        return await upgrade(connection)
    finally:
        await connection.close()


@pytest.fixture
async def citus_pool(cluster: CitusCluster, upgraded: list[str]) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(cluster.url(), size_min=1, size_max=10)
    yield pool
    await pool.close()


@pytest.fixture
def citus_ledger(citus_pool: asyncpg.Pool) -> Ledger:
    return Ledger(EventStore(citus_pool), code_key=b"k" * 32)


async def two_phase_commits(pool: asyncpg.Pool) -> set[str]:
    """The coordinator's record of transactions it committed across nodes (two-phase)."""
    return {row["gid"] for row in await pool.fetch("select gid from pg_dist_transaction")}


async def shard_of(pool: asyncpg.Pool, card_id: str) -> tuple[str, int]:
    """(the shard table's name, the port of the worker holding it) for a card's events."""
    row = await pool.fetchrow(
        "select s.shard_name, s.nodeport from citus_shards s"
        " where s.shardid = get_shard_id_for_distribution_column('events', $1::text) and s.table_name = 'events'::regclass",
        card_id,
    )
    return row["shard_name"], row["nodeport"]


async def assert_each_shard_is_a_source(pool: asyncpg.Pool) -> None:
    """Every event's source is the shard it lives in, and no seq of a source is taken twice: also
    after shards moved (a moved row keeps its seq; its new worker continues after them). Numbers
    may be left unused, by appends that lost their race (see ledger.eventstore.commit_order)."""
    rows = await pool.fetch(
        "select source, count(*) as n, count(distinct seq) as seqs, max(seq) as last,"
        " bool_and(source = get_shard_id_for_distribution_column('events', stream_id)) as in_its_shard"
        " from events group by source"
    )
    assert rows and all(r["in_its_shard"] and r["n"] == r["seqs"] <= r["last"] for r in rows), rows


async def assert_read_models_caught_up(pool: asyncpg.Pool, client: NativeClient, cards: list[str]) -> None:
    """The projection runner in serve applies every event of every shard once: the balances it
    projects are the ledger's, and no source is left behind."""
    async with asyncio.timeout(SCENARIO_TIMEOUT_S):
        while any(status.lag_events for status in await checkpoints.statuses(pool)):
            await asyncio.sleep(0.2)
    [balances] = [s for s in await checkpoints.statuses(pool) if s.name == card_balances.NAME]
    assert len(balances.lag_by_source) > 1 and set(balances.lag_by_source) <= set(await EventStore(pool).sources())
    projected = await pool.fetch(
        "select card_id, available from read_card_balances where card_id = any($1::text[])", cards
    )
    assert {r["card_id"]: Decimal(r["available"]) / 100 for r in projected} == {
        card_id: await client.balance(card_id) for card_id in cards
    }


async def test_upgrade_distributes_events_by_card_and_colocates_snapshots(upgraded, citus_pool, cluster):
    assert "events distributed by stream_id" in upgraded
    methods = {
        row["table"]: (row["method"], row["colocation"])
        for row in await citus_pool.fetch(
            "select logicalrelid::text as table, partmethod::text as method, colocationid as colocation"
            " from pg_dist_partition"
        )
    }
    assert methods["events"][0] == "h" and methods["snapshots"] == methods["events"]
    assert methods["card_lookup"][0] == "n"  # a reference table: a copy on every node
    placements = await citus_pool.fetch(
        "select distinct nodeport from citus_shards where table_name = 'events'::regclass"
    )
    assert {row["nodeport"] for row in placements} == {worker.port for worker in cluster.workers}
    async with citus_pool.acquire() as connection:
        assert await upgrade(connection) == []  # distributed once; a second upgrade changes nothing


async def test_card_commands_are_local_transactions_on_one_shard(citus_ledger, citus_pool):
    cards = [str((await issue(citus_ledger)).card.id) for _ in range(6)]
    before = await two_phase_commits(citus_pool)
    for card_id in cards:
        await citus_ledger.create_transaction(
            card_id, operation="Credit", value=Decimal(50), description="", request_id="load"
        )
    debits = [
        citus_ledger.create_transaction(card_id, operation=DEBIT, value=Decimal(1), description="", request_id=f"d{n}")
        for card_id in cards
        for n in range(5)
    ]
    done = await asyncio.gather(*debits)  # group commit's batches hold cards of every shard
    assert len({t.id for t in done}) == 30
    transaction_id = done[0].id
    await citus_ledger.settle(cards[0], transaction_id, value=Decimal(1), request_id="s")
    await citus_ledger.cancel(cards[1], done[5].id, value=Decimal(1), request_id="c")
    assert await two_phase_commits(citus_pool) - before == set()
    fresh = Ledger(EventStore(citus_pool), code_key=b"k" * 32)
    assert [(await fresh.card(c)).balance for c in cards] == [4500, 4600, 4500, 4500, 4500, 4500]


async def cards_on_two_shards(ledger: Ledger, store: EventStore, each: int) -> tuple[list[str], list[str]]:
    """Issued cards until two shards hold ``each`` of them (a card's id picks its shard)."""
    by_shard: dict[int, list[str]] = {}
    while sum(len(cards) >= each for cards in by_shard.values()) < 2:
        card_id = str((await issue(ledger)).card.id)
        by_shard.setdefault((await store.shards_of([card_id]))[card_id], []).append(card_id)
    first, second = [cards[:each] for cards in by_shard.values() if len(cards) >= each][:2]
    return first, second


def next_event(stream_id: str, tail: RecordedEvent, *, key: str | None = None, previous_hash: bytes | None = None):
    """A group-commit row appending one event after ``tail`` (with another previous hash if given)."""
    event = NewEvent("Noted", b'{"note":"batch"}')
    previous = tail.hash if previous_hash is None else previous_hash
    hash_ = chain_hash(previous, stream_id, tail.version + 1, event.type, event.data)
    return OneEvent(stream_id, tail.version, event, previous, hash_, key, None)


async def test_a_batch_across_shards_judges_each_row_on_its_own(citus_ledger, citus_pool):
    """Group commit on the cluster sends one call per shard; inside a call, a row that lost its
    race, reuses a requestId or does not follow its stream's last event is skipped, and the rows
    beside it, on its shard and on the other, are appended, each shard in one local transaction."""
    store = EventStore(citus_pool)
    (fresh_a, raced, reused), (fresh_b, stale, _) = await cards_on_two_shards(citus_ledger, store, 3)
    tails = {c: (await store.read_stream(c))[-1] for c in (fresh_a, raced, reused, fresh_b, stale)}
    # Meanwhile another writer appended to `raced`, and `reused` holds the requestId "dup" already.
    await store.append(raced, tails[raced].version, [NewEvent("Noted", b"{}")], previous_hash=tails[raced].hash)
    noted = [NewEvent("Noted", b"{}")]
    await store.append(reused, tails[reused].version, noted, previous_hash=tails[reused].hash, idempotency_key="dup")
    tails[reused] = (await store.read_stream(reused))[-1]
    before = await two_phase_commits(citus_pool)
    appended = await store.append_each(
        [
            next_event(fresh_a, tails[fresh_a], key="a"),
            next_event(raced, tails[raced], key="r"),  # its version is taken: unique (stream_id, version)
            next_event(reused, tails[reused], key="dup"),  # unique (stream_id, idempotency_key)
            next_event(fresh_b, tails[fresh_b], key="b"),
            next_event(stale, tails[stale], previous_hash=b"not its last hash"),  # its guard fails
        ]
    )
    assert appended == {fresh_a, fresh_b}
    assert await two_phase_commits(citus_pool) - before == set()
    versions = {c: [e.version for e in await store.read_stream(c)] for c in tails}
    assert versions == {fresh_a: [1, 2], raced: [1, 2], reused: [1, 2], fresh_b: [1, 2], stale: [1]}
    for card_id in tails:
        verify_chain(await store.read_stream(card_id))
    assert (await store.read_stream(raced))[1].data == b"{}"  # the other writer's event stayed


async def test_events_are_immutable_on_the_coordinator_and_on_each_shard(citus_ledger, citus_pool, cluster):
    card_id = str((await issue(citus_ledger)).card.id)
    for statement in ("update events set type = 'x'", "delete from events", "truncate events"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="immutable"):
            await citus_pool.execute(statement)
    shard, port = await shard_of(citus_pool, card_id)
    worker = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/{cluster.database}")
    try:
        # Citus refuses changes to a shard by default; an operator may lift that: the triggers still refuse.
        await worker.execute("set citus.enable_manual_changes_to_shards = on")
        for statement in (f"update {shard} set type = 'x'", f"delete from {shard}", f"truncate {shard}"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="immutable"):
                await worker.execute(statement)
        assert await worker.fetchval(f"select count(*) from {shard} where stream_id = $1", card_id) == 1
    finally:
        await worker.close()


async def test_concurrent_debits_through_serve_never_double_spend(cluster, upgraded, citus_pool, http, tmp_path: Path):
    hub = HubProcess(cluster.url(), tmp_path / "hub.log", env=HUB_ENV)
    await hub.start()
    try:
        client = NativeClient(http, hub.base_url)
        cards, debits = await funded_load(client, 6, 700, [Decimal("1.00")])
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            await send_all([client], debits, concurrency=64, policy=RetryPolicy(), deadline=deadline_in(60))
        print(summary(debits))
        assert Counter((d.status, d.code) for d in debits) == {(200, None): 600, (422, "insufficient_funds"): 100}
        await assert_ledger_consistent(citus_pool, client, debits, credits_of(cards, LOAD_CREDIT))
        await assert_each_shard_is_a_source(citus_pool)
        await assert_read_models_caught_up(citus_pool, client, cards)
    finally:
        await hub.stop()


async def cards_on_and_off(client: NativeClient, pool: asyncpg.Pool, worker, each: int = 3) -> tuple[list, list]:
    """Funded cards until ``each`` live on ``worker`` and ``each`` elsewhere (a card's id picks its shard)."""
    on, off = [], []
    while len(on) < each or len(off) < each:
        (card_id,) = await funded_cards(client, 1, Decimal("10.00"))
        (on if (await shard_of(pool, card_id))[1] == worker.port else off).append(card_id)
    return on[:each], off[:each]


async def test_a_worker_down_fails_only_its_cards_and_they_catch_up(cluster, upgraded, citus_pool, http, tmp_path):
    hub = HubProcess(cluster.url(), tmp_path / "hub.log", env=HUB_ENV)
    await hub.start()
    try:
        client = NativeClient(http, hub.base_url)
        down = cluster.workers[0]
        on_down, on_up = await cards_on_and_off(client, citus_pool, down)
        cards = on_down + on_up
        await asyncio.to_thread(down.stop, "immediate")
        try:
            for card_id in on_down:
                answer = await client.transaction(card_id, "Debit", Decimal("1.00"), "while-down", timeout_s=30)
                assert answer.status == 503, answer
                assert int(answer.headers["Retry-After"]) > 0
            for card_id in on_up:
                answer = await client.transaction(card_id, "Debit", Decimal("1.00"), "while-down", timeout_s=30)
                assert answer.status == 200, answer
        finally:
            await asyncio.to_thread(down.start)
        for card_id in cards:  # the retry of the refused ones applies them once; the others replay
            answer = await client.transaction(card_id, "Debit", Decimal("1.00"), "while-down", timeout_s=30)
            assert answer.status == 200, answer
        for card_id in cards:
            assert await client.balance(card_id) == Decimal("9.00")
            debited = await citus_pool.fetchval(
                "select count(*) from events where stream_id = $1 and type like '%Debited'", card_id
            )
            assert debited == 1
    finally:
        await hub.stop()


async def test_bulk_issuance_across_shards_resumes_and_never_issues_a_card_twice(
    citus_ledger, citus_pool, cluster, tmp_path
):
    issuer = BulkIssuer(citus_ledger, chunk_cards=16)
    defaults = BatchDefaults(currency="USD", expiring_date=citus_ledger.clock() + timedelta(days=365))
    output = tmp_path / "codes.csv"
    first = await issuer.issue_to_file(
        BatchRequest(batch_id="citus", count=40, value=Decimal(5)), defaults, output, metadata={}
    )
    again = await issuer.issue_to_file(
        BatchRequest(batch_id="citus", count=64, value=Decimal(5)), defaults, tmp_path / "more.csv", metadata={}
    )
    assert (first.issued_now, again.issued_now, again.already_issued) == (40, 24, 40)
    cards = await citus_pool.fetch(
        "select card_id from card_lookup where starts_with(relation_name, 'citus-') order by relation_name"
    )
    assert len(cards) == 64
    ids = [row["card_id"] for row in cards]
    assert {port for _, port in [await shard_of(citus_pool, c) for c in ids]} == {
        worker.port for worker in cluster.workers
    }
    per_card = await citus_pool.fetch(
        "select stream_id, count(*) as n, sum((data->>'value')::bigint) filter (where type like '%Credited') as credited"
        " from events where stream_id = any($1::text[]) group by stream_id",
        ids,
    )
    assert {(row["n"], row["credited"]) for row in per_card} == {(2, 500)} and len(per_card) == 64


async def move_shards_of(pool: asyncpg.Pool, cluster: CitusCluster, cards: list[str]) -> list[float]:
    """Moves each card's shard (and the shards co-located with it) to the other worker, one at a
    time, online (logical replication); returns how long each move took."""
    took = []
    for card_id in cards:
        shard_id = await pool.fetchval("select get_shard_id_for_distribution_column('events', $1::text)", card_id)
        _, port = await shard_of(pool, card_id)
        target = next(worker.port for worker in cluster.workers if worker.port != port)
        started = asyncio.get_running_loop().time()
        await pool.execute(
            "select citus_move_shard_placement($1, '127.0.0.1', $2, '127.0.0.1', $3, 'force_logical')",
            shard_id,
            port,
            target,
            timeout=120,
        )
        took.append(asyncio.get_running_loop().time() - started)
        assert (await shard_of(pool, card_id))[1] == target
    return took


BIG, SMALL = "bigstore", "smallstore"


def as_role(cluster: CitusCluster, role: str) -> str:
    return f"postgresql://{role}@{cluster.coordinator.host_port}/{cluster.database}"


async def store_client(pool: asyncpg.Pool, http, hub: HubProcess, tenant: str) -> NativeClient:
    """A client of the native API with a new provider key of ``tenant`` (made before the hub starts: it reads them then)."""
    key, token = await auth.create_key(pool, auth.PROVIDER, auth.ROLES, tenant)
    return NativeClient(http, hub.base_url, {"X-PROVIDER-API-AppKey": key, "X-PROVIDER-API-AppToken": token})


async def test_shards_move_while_two_stores_debit_and_nothing_is_lost_doubled_or_crossed(
    cluster, upgraded, citus_pool, citus_service_role, http, tmp_path
):
    """A large store and a small one on a hub that runs as the service's role, so row-level security
    on the workers is what keeps them apart. The shards of three of the large store's cards move to
    the other worker while both stores' Debits flow: each Debit is applied once, in its own store."""
    hub = HubProcess(as_role(cluster, citus_service_role), tmp_path / "hub.log", env=HUB_ENV)
    big, small = [await store_client(citus_pool, http, hub, tenant) for tenant in (BIG, SMALL)]
    await hub.start()
    try:
        big_cards, big_debits = await funded_load(big, 5, 3400, [Decimal("0.01")])  # outlasts the moves
        small_cards, small_debits = await funded_load(small, 1, 600, [Decimal("0.01")])
        for debit in small_debits:
            debit.target = 1  # sent by the small store's client
        debits = big_debits + small_debits
        random.Random(23).shuffle(debits)  # the two stores' Debits interleaved

        async def move_when_flowing() -> tuple[list[float], int, int]:
            """The first move starts once Debits flow and must end while they still do."""
            await until_acknowledged(debits, 60, deadline_in(60))
            before = acknowledged_count(debits)
            took = await move_shards_of(citus_pool, cluster, big_cards[:1])
            during = acknowledged_count(debits)
            return took + await move_shards_of(citus_pool, cluster, big_cards[1:3]), before, during

        async with asyncio.timeout(SCENARIO_TIMEOUT_S * 2):
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    send_all([big, small], debits, concurrency=32, policy=RetryPolicy(), deadline=deadline_in(150))
                )
                moving = group.create_task(move_when_flowing())
        took, acknowledged_before, acknowledged_after = moving.result()
        print(f"{summary(debits)}; shard moves took {[round(s, 2) for s in took]} s")
        assert acknowledged_before < acknowledged_after < len(debits), "the first move did not overlap the Debits"
        assert not any(d.server_errors for d in debits), [d.server_errors[0] for d in debits if d.server_errors][:3]
        assert all(d.acknowledged for d in debits), summary(debits)
        for client, cards, its_debits in ((big, big_cards, big_debits), (small, small_cards, small_debits)):
            await assert_ledger_consistent(citus_pool, client, its_debits, credits_of(cards, LOAD_CREDIT))
            await assert_read_models_caught_up(citus_pool, client, cards)
        tenants = await citus_pool.fetch(
            "select distinct stream_id, tenant_id from events where stream_id = any($1::text[])",
            big_cards + small_cards,
        )
        assert {(r["stream_id"], r["tenant_id"]) for r in tenants} == {(c, BIG) for c in big_cards} | {
            (c, SMALL) for c in small_cards
        }
        assert (await small.call("GET", f"/giftcards/{big_cards[0]}")).status == 404, "a moved card stays in its store"
        await assert_each_shard_is_a_source(citus_pool)
    finally:
        await hub.stop()


async def test_one_large_store_s_cards_spread_over_every_worker(cluster, citus_pool, citus_service_role):
    """Cards, not stores, are distributed: a store with many more cards than the others has them on
    every worker's shards. As the service's role, in one store's scope, the other's rows are not there."""
    pool = await create_pool(as_role(cluster, citus_service_role), size_min=1, size_max=4)
    try:
        ledger = Ledger(EventStore(pool), code_key=b"k" * 32)
        cards: dict[str, list[str]] = {}
        for tenant, count in ((BIG, 40), (SMALL, 2)):
            await auth.create_key(citus_pool, auth.PROVIDER, auth.ROLES, tenant)  # the store exists
            with tenant_scope(tenant):
                cards[tenant] = [str((await issue(ledger)).card.id) for _ in range(count)]
        with tenant_scope(SMALL):
            for table, column in (("events", "stream_id"), ("card_lookup", "card_id")):
                query = f"select count(*) from {table} where {column} = any($1::text[])"
                assert await pool.fetchval(query, cards[BIG]) == 0, table
                assert await pool.fetchval(query, cards[SMALL]) > 0, table
        assert await pool.fetchval("select count(*) from events") == 0, "no scope, nothing"
    finally:
        await pool.close()
    stored = await citus_pool.fetch(
        "select distinct stream_id, tenant_id from events where stream_id = any($1)", cards[BIG]
    )
    assert {(r["stream_id"], r["tenant_id"]) for r in stored} == {(card_id, BIG) for card_id in cards[BIG]}
    per_worker = Counter([(await shard_of(citus_pool, card_id))[1] for card_id in cards[BIG]])
    print(f"the large store's cards per worker (port): {dict(per_worker)}")
    # 40 cards over 8 shards on 2 workers: one worker holding none has odds of 1e-12.
    assert set(per_worker) == {worker.port for worker in cluster.workers}


async def streams_on_two_shards(pool: asyncpg.Pool) -> tuple[str, str]:
    """Two stream ids whose events live on different shards (different sources)."""
    first = f"s-{uuid.uuid4()}"
    while True:
        second = f"s-{uuid.uuid4()}"
        if (await shard_of(pool, second))[0] != (await shard_of(pool, first))[0]:
            return first, second


async def test_an_open_transaction_on_one_shard_holds_back_no_other_source(citus_pool, cluster):
    """A transaction left open after appending holds its own source's next seq, on its worker; the
    other shards' events go on being appended and read. One server's reader would have waited for it
    (it held the oldest transaction id), as it would for any long transaction on any node."""
    store = EventStore(citus_pool)
    held_stream, free_stream = await streams_on_two_shards(citus_pool)
    note = NewEvent("Noted", canonical_json(b'{"n": 1}'))
    before = await store.head()
    held = await asyncpg.connect(cluster.url())
    idle_on_a_worker = await asyncpg.connect(cluster.workers[0].url("postgres"))
    try:
        await idle_on_a_worker.execute("begin")
        await idle_on_a_worker.fetchval("select pg_current_xact_id()")  # keeps a transaction id
        transaction = held.transaction()
        await transaction.start()
        await store.append(held_stream, 0, [note], connection=held)
        async with asyncio.timeout(10):  # another source: it does not wait for the open one
            await store.append(free_stream, 0, [note])
        read = await store.read_all(before, 100)
        assert [e.stream_id for e in read] == [free_stream]
        shard = await citus_pool.fetchval(
            "select get_shard_id_for_distribution_column('events', $1::text)", free_stream
        )
        assert (read[0].source, read[0].seq) == (shard, before.seq(shard) + 1)
        await transaction.commit()
    finally:
        await held.close()
        await idle_on_a_worker.close()
    assert {e.stream_id for e in await store.read_all(before, 100)} == {held_stream, free_stream}


async def test_a_source_is_read_on_its_own_shard_alone(citus_pool, cluster):
    """source_events runs on the worker of the shard its route names and reads that shard's table
    only: it answers while another shard is locked on its worker, where a read of events by source
    from the coordinator, sent to every shard, waits for the lock."""
    store = EventStore(citus_pool)
    read_stream, locked_stream = await streams_on_two_shards(citus_pool)
    note = NewEvent("Noted", canonical_json(b'{"n": 1}'))
    for stream_id in (read_stream, locked_stream):
        await store.append(stream_id, 0, [note])
    source = await store.source_of(read_stream)
    locked_shard, port = await shard_of(citus_pool, locked_stream)
    locker = await asyncpg.connect(next(w for w in cluster.workers if w.port == port).url(cluster.database))
    try:
        await locker.execute("begin; set local citus.enable_manual_changes_to_shards = on")
        await locker.execute(f"lock table {locked_shard} in access exclusive mode")
        async with asyncio.timeout(10):
            rows = await citus_pool.fetch(
                "select stream_id from source_events($1, $2, 0, 100000, '*')", read_stream, source
            )
        assert read_stream in {row["stream_id"] for row in rows}
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1):
                await citus_pool.fetch("select stream_id from events where source = $1 order by seq", source)
    finally:
        await locker.close()


async def test_a_batch_shares_its_limit_among_the_shards_that_have_events(citus_pool):
    """read_all asks every shard for an equal share of the batch; what the shards with fewer events
    leave goes to the others, so a batch is full whenever that many events follow, and each shard's
    events come as a prefix of its commit order."""
    store = EventStore(citus_pool)
    busy, quiet = await streams_on_two_shards(citus_pool)
    before = await store.head()
    await store.append(busy, 0, [NewEvent("Noted", canonical_json(b'{"n": %d}' % n)) for n in range(30)])
    await store.append(quiet, 0, [NewEvent("Noted", canonical_json(b'{"n": 0}'))])
    first = await store.read_all(before, 20)
    assert len(first) == 20
    rest = await store.read_all(before.past(first), 20)
    assert len(rest) == 11 and await store.read_all(before.past(first + rest), 20) == []
    by_stream = {s: [e.version for e in first + rest if e.stream_id == s] for s in (busy, quiet)}
    assert by_stream == {busy: list(range(1, 31)), quiet: [1]}
    async with citus_pool.acquire() as connection:  # the one-statement read, as inside a transaction
        assert {e.position for e in await store.read_all(before, 100, connection=connection)} == {
            e.position for e in first + rest
        }


@pytest.fixture
async def citus_service_role(citus_pool: asyncpg.Pool, cluster: CitusCluster) -> AsyncIterator[str]:
    """A login role given what ``giftcard db grant`` gives, on the coordinator (Citus carries it to the workers)."""
    role = f"giftcard_app_{uuid.uuid4().hex[:8]}"
    await citus_pool.execute(f"create role {role} login")
    async with citus_pool.acquire() as connection:
        await grant_service_role(connection, role)
    yield role


async def test_db_grant_lets_the_service_role_run_the_ledger_and_never_rewrite_it(citus_service_role, cluster):
    url = f"postgresql://{citus_service_role}@{cluster.coordinator.host_port}/{cluster.database}"
    pool = await create_pool(url, size_min=1, size_max=4)
    try:
        with tenant_scope(DEFAULT_TENANT):  # as a request with a key of the default tenant runs
            async with pool.acquire() as connection:
                assert await upgrade(connection) == [], "a distributed, current schema needs no DDL rights"
            ledger = Ledger(EventStore(pool), code_key=b"k" * 32)
            card_id = str((await issue(ledger)).card.id)
            await ledger.create_transaction(
                card_id, operation="Credit", value=Decimal(5), description="", request_id="c"
            )
            await ledger.create_transaction(card_id, operation=DEBIT, value=Decimal(2), description="", request_id="d")
            assert (await ledger.card(card_id)).balance == 300
            for statement in (
                "update events set type = 'Forged'",
                "delete from events",
                "truncate events",
                "alter table events disable trigger user",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await pool.execute(statement)
    finally:
        await pool.close()


WORKER_TABLES = ("events", "snapshots", "card_lookup")


async def row_security_of_placements(pool: asyncpg.Pool) -> set[tuple[bool, bool]]:
    """(enabled, forced) as every shard placement of the workers' tables holds it."""
    found = set()
    for table in WORKER_TABLES:
        for row in await pool.fetch(
            "select result from run_command_on_placements($1,"
            " $$select relrowsecurity || ',' || relforcerowsecurity from pg_class where oid = '%s'::regclass$$)",
            table,
        ):
            enabled, forced = row["result"].split(",")
            found.add((enabled == "true", forced == "true"))
    return found


async def test_upgrade_turns_row_level_security_on_for_every_shard_of_a_cluster_distributed_before(citus_pool):
    """An earlier release left row-level security off on the tables of the workers; migration 0019
    turns it on, on every shard placement, not forced (see ledger.postgres.distribution)."""
    async with citus_pool.acquire() as connection:
        for table in WORKER_TABLES:
            await connection.execute(f"alter table {table} disable row level security, no force row level security")
        await connection.execute("delete from schema_migrations where version = 19")
    assert await row_security_of_placements(citus_pool) == {(False, False)}
    async with citus_pool.acquire() as connection:
        assert "0019_row_security_on_citus_workers" in await upgrade(connection)
    assert await row_security_of_placements(citus_pool) == {(True, False)}


# Last in this file: it leaves the cluster with a third worker.
async def test_a_worker_added_with_the_cli_takes_shards_by_rebalancing_and_serves_its_cards(
    cluster, citus_ledger, citus_pool
):
    # 40 cards: every one of the 8 shards holds some (a card on a moved shard is missed with odds below 1e-4)
    cards = [str((await issue(citus_ledger)).card.id) for _ in range(40)]
    for card_id in cards:
        await citus_ledger.create_transaction(
            card_id, operation="Credit", value=Decimal(9), description="", request_id="c"
        )
    new = await asyncio.to_thread(cluster.start_another_worker)
    code, out, err = await giftcard(
        {"GIFTCARD_DATABASE_URL": cluster.url()}, "db", "add-worker", "127.0.0.1", "--port", str(new.port)
    )
    assert code == 0 and f"127.0.0.1:{new.port} added" in out, (out, err)
    admin = await asyncpg.connect(cluster.url())
    try:
        await admin.execute("set statement_timeout = 0")  # a rebalance outlasts any request's statement
        await admin.execute("select citus_rebalance_start()")
        await admin.execute("select citus_rebalance_wait()", timeout=300)
    finally:
        await admin.close()
    held = await citus_pool.fetchval(
        "select count(*) from citus_shards where table_name = 'events'::regclass and nodeport = $1", new.port
    )
    assert held > 0, "the rebalance moved no shard to the new worker"
    moved = [c for c in cards if (await shard_of(citus_pool, c))[1] == new.port]
    assert moved, "none of the forty cards moved: their shards all stayed"
    fresh = Ledger(EventStore(citus_pool), code_key=b"k" * 32)
    for card_id in moved:
        await fresh.create_transaction(card_id, operation=DEBIT, value=Decimal(4), description="", request_id="after")
        assert (await fresh.card(card_id)).balance == 500


# The previous release's schema, as far as functions go: append_event, which nothing called any more,
# and a body of source_head older than the one shipped (this one answers no head at all).
PREVIOUS_APPEND_EVENT = """
create or replace function append_event(
    p_stream_id text, p_expected integer, p_type text, p_data jsonb, p_metadata jsonb, p_hash bytea,
    p_idempotency_key text, p_previous_hash bytea
) returns bigint language plpgsql as $$
declare
    appended bigint;
begin
    if p_expected > 0 and not exists (
        select 1 from events where stream_id = p_stream_id and version = p_expected and hash = p_previous_hash
    ) then
        return null;
    end if;
    insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
    values (p_stream_id, p_expected + 1, p_type, p_data, p_metadata, p_hash, p_idempotency_key)
    returning position into appended;
    return appended;
end
$$
"""
OLDER_SOURCE_HEAD = """
create or replace function source_head(p_route text, p_source bigint, p_scope text) returns bigint language plpgsql stable as $$
begin
    return null;
end
$$
"""
# The form of source_head before it took the reader's tenant scope to the worker.
SOURCE_HEAD_WITHOUT_SCOPE = """
create or replace function source_head(p_route text, p_source bigint) returns bigint language plpgsql stable as $$
begin
    return null;
end
$$
"""
_BODY = "select prosrc from pg_proc where oid = to_regprocedure($1)"


async def bodies_on_every_node(cluster: CitusCluster, signature: str) -> list[str | None]:
    """The function's body as each node (coordinator, then workers) holds it; None where it does not exist."""
    found = []
    for node in cluster.nodes:
        connection = await asyncpg.connect(node.url(cluster.database))
        try:
            found.append(await connection.fetchval(_BODY, signature))
        finally:
            await connection.close()
    return found


async def test_upgrade_of_a_running_cluster_installs_every_function_body_shipped(cluster, citus_ledger, citus_pool):
    cards = [str((await issue(citus_ledger)).card.id) for _ in range(4)]
    async with citus_pool.acquire() as connection:
        await connection.execute(PREVIOUS_APPEND_EVENT)
        await connection.execute(
            "select create_distributed_function($1, 'p_stream_id', colocate_with => 'events')",
            "append_event(text, integer, text, jsonb, jsonb, bytea, text, bytea)",
        )
        await connection.execute(OLDER_SOURCE_HEAD)
        await connection.execute(SOURCE_HEAD_WITHOUT_SCOPE)
        await connection.execute(
            "select create_distributed_function($1, 'p_route', colocate_with => 'events')", "source_head(text, bigint)"
        )
    older = OLDER_SOURCE_HEAD.split("$$")[1]
    assert await bodies_on_every_node(cluster, "source_head(text, bigint, text)") == [older] * len(cluster.nodes)
    store = EventStore(citus_pool)
    assert await store.head() == Checkpoint()  # the older body answers no head, on every worker

    async with citus_pool.acquire() as connection:
        done = await upgrade(connection)

    assert "source_head reads on the shard's worker" in done and "append_event dropped" in done
    [shipped] = [f.body for f in distribution.FUNCTIONS if f.signature == "source_head(text, bigint, text)"]
    assert await bodies_on_every_node(cluster, "source_head(text, bigint, text)") == [shipped] * len(cluster.nodes)
    retired = "append_event(text, integer, text, jsonb, jsonb, bytea, text, bytea)"
    assert await bodies_on_every_node(cluster, retired) == [None] * len(cluster.nodes)
    assert "source_head dropped" in done, "the form that took no tenant scope"
    assert await bodies_on_every_node(cluster, "source_head(text, bigint)") == [None] * len(cluster.nodes)
    async with citus_pool.acquire() as connection:
        one_statement = await EventStore(connection).head()  # not delegated: reads every shard from here
        assert await upgrade(connection) == []  # current now: a second upgrade changes nothing
    assert await EventStore(citus_pool).head() == one_statement
    assert set((await store.shards_of(cards)).values()) <= set(one_statement.as_dict())


# Every shard of events that holds the index of migration 0021 ('%s' is each shard's table).
_SHARDS_INDEXED_BY_TENANT = """
select result from run_command_on_shards('events',
    $$select count(*) from pg_indexes where tablename = '%s' and indexdef like '%%(tenant_id, source, seq)'$$)
"""


async def test_upgrade_of_a_running_cluster_indexes_each_stores_events_on_every_shard(citus_ledger, citus_pool):
    """Migration 0021 applied to a cluster whose events are distributed already: the index reaches
    every shard. A store's reads name it, so on the workers it finds its own events, and another
    store none, also for a role that row-level security lets through (this superuser)."""
    store = EventStore(citus_pool)
    before = await store.head()
    cards = {str((await issue(citus_ledger)).card.id) for _ in range(4)}
    async with citus_pool.acquire() as connection:
        await connection.execute("drop index events_by_tenant")
        await connection.execute("delete from schema_migrations where version = 21")
        assert await upgrade(connection) == ["0021_events_by_tenant"]
        indexed = [row["result"] for row in await connection.fetch(_SHARDS_INDEXED_BY_TENANT)]
    assert len(indexed) > 1 and set(indexed) == {"1"}

    everyone_head = (await store.head()).as_dict()
    with tenant_scope(DEFAULT_TENANT):
        assert {e.stream_id for e in await store.read_all(before, 1000)} == cards
        default_head = (await store.head()).as_dict()
    # Other tests may have left other stores' events on some shards; the last event on each shard
    # of these cards is one of theirs, the default tenant's.
    assert all(default_head[shard] <= seq for shard, seq in everyone_head.items() if shard in default_head)
    for shard in set((await store.shards_of(sorted(cards))).values()):
        assert default_head[shard] == everyone_head[shard]
    with tenant_scope("acme"):
        assert await store.read_all(before, 1000) == [] and await store.head() == Checkpoint()
        assert await store.next_recorded_at(before) is None
