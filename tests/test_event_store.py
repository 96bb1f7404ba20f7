"""The event store against a real PostgreSQL: optimistic appends, immutability, the hash
chain, and a global order that never skips a late commit."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ledger.domain.errors import ConcurrentUpdate, InvalidRequest
from ledger.eventstore.codec import canonical_json
from ledger.eventstore.commit_order import START
from ledger.eventstore.store import (
    _APPEND_EACH,
    _READ_STREAMS_AFTER,
    GENESIS_HASH,
    ChainBroken,
    EventStore,
    NewEvent,
    OneEvent,
    Snapshot,
    StreamAppend,
    _append_each_document,
    verify_chain,
)
from tests.audit_ledgers import as_owner_bypassing_immutability

pytestmark = pytest.mark.also_on_citus


def ev(n: int, type_: str = "Tested") -> NewEvent:
    return NewEvent(type_, canonical_json(b'{"n": %d, "text": "caf\\u00e9"}' % n))


async def test_append_and_read_a_stream(store: EventStore):
    last = await store.append("s1", 0, [ev(1), ev(2)], metadata={"actor": "test"})
    last = await store.append("s1", 2, [ev(3)], previous_hash=last)
    events = await store.read_stream("s1")
    assert [e.version for e in events] == [1, 2, 3]
    assert events[0].metadata == {"actor": "test"}
    assert verify_chain(events) == last
    assert [e.version for e in await store.read_stream("s1", from_version=2)] == [2, 3]


async def test_a_stale_expected_version_is_a_conflict(store: EventStore):
    last = await store.append("s1", 0, [ev(1)])
    await store.append("s1", 1, [ev(2)], previous_hash=last)
    with pytest.raises(ConcurrentUpdate):
        await store.append("s1", 1, [ev(3)], previous_hash=last)
    with pytest.raises(ConcurrentUpdate):
        await store.append("s1", 0, [ev(3)])


async def test_an_append_cannot_leave_a_gap_or_chain_onto_a_wrong_hash(store: EventStore):
    last = await store.append("s1", 0, [ev(1)])
    with pytest.raises(ConcurrentUpdate):
        await store.append("s1", 5, [ev(6)], previous_hash=last)
    with pytest.raises(ConcurrentUpdate):
        await store.append("s1", 1, [ev(2)], previous_hash=b"\x00" * 32)
    assert len(await store.read_stream("s1")) == 1


async def test_concurrent_appends_at_the_same_version_one_wins(store: EventStore):
    last = await store.append("s1", 0, [ev(1)])
    results = await asyncio.gather(
        *(store.append("s1", 1, [ev(i)], previous_hash=last) for i in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, ConcurrentUpdate) for r in results if isinstance(r, Exception))


async def test_an_idempotency_key_is_unique_per_stream(store: EventStore):
    last = await store.append("s1", 0, [ev(1)], idempotency_key="k")
    with pytest.raises(ConcurrentUpdate):
        await store.append("s1", 1, [ev(2)], previous_hash=last, idempotency_key="k")
    await store.append("s2", 0, [ev(1)], idempotency_key="k")


async def test_text_postgres_cannot_store_is_a_clear_client_error(store: EventStore):
    with pytest.raises(InvalidRequest):
        await store.append("s1", 0, [NewEvent("Tested", b'{"text":"nul \\u0000 here"}')])
    assert await store.read_stream("s1") == []


@pytest.mark.parametrize(
    "statement",
    ["update events set type = 'Forged'", "delete from events", "truncate events"],
)
async def test_the_event_table_refuses_update_delete_and_truncate(store: EventStore, pool, statement):
    await store.append("s1", 0, [ev(1)])
    with pytest.raises(asyncpg.PostgresError, match="immutable"):
        await pool.execute(statement)
    assert len(await store.read_stream("s1")) == 1


async def test_an_altered_event_is_detected_by_the_hash_chain(store: EventStore, pool):
    last = await store.append("s1", 0, [ev(1), ev(2)])
    await store.append("s1", 2, [ev(3)], previous_hash=last)
    # The owner (on Citus, a superuser) can switch the triggers off; the chain still tells.
    await as_owner_bypassing_immutability(
        pool, """update events set data = '{"n": 99, "text": "café"}' where version = 2"""
    )
    with pytest.raises(ChainBroken, match="version 2"):
        verify_chain(await store.read_stream("s1"))


async def test_a_removed_event_is_detected_by_the_hash_chain(store: EventStore, pool):
    await store.append("s1", 0, [ev(1), ev(2), ev(3)])
    await as_owner_bypassing_immutability(pool, "delete from events where version = 2")
    with pytest.raises(ChainBroken, match="version 2 missing"):
        verify_chain(await store.read_stream("s1"))


async def lanes_of(store: EventStore, *stream_ids: str) -> list[int]:
    """Each stream's source: a lane on one server, a shard on Citus."""
    return [await store.source_of(stream_id) for stream_id in stream_ids]


async def streams_in_lanes(store: EventStore, same: int, other: int = 0) -> list[str]:
    """``same`` stream ids that share one lane (one source), then ``other`` ids in other lanes."""
    first = "s-0"
    (lane,) = await lanes_of(store, first)
    same_ids, other_ids, n = [first], [], 0
    while len(same_ids) < same or len(other_ids) < other:
        n += 1
        (found,) = await lanes_of(store, f"s-{n}")
        (same_ids if found == lane else other_ids).append(f"s-{n}")
    return same_ids[:same] + other_ids[:other]


async def test_read_all_follows_commit_order_in_batches(store: EventStore, pool: asyncpg.Pool):
    a, b = await streams_in_lanes(store, 2)
    await store.append(a, 0, [ev(1), ev(2)])
    await store.append(b, 0, [ev(3)])
    first = await store.read_all(limit=2)
    rest = await store.read_all(after=START.past(first), limit=10)
    assert [(e.stream_id, e.version, e.seq) for e in first + rest] == [(a, 1, 1), (a, 2, 2), (b, 1, 3)]
    assert await store.read_all(after=START.past(first + rest)) == []
    assert await store.head() == START.past(first + rest)


async def test_each_lane_is_a_source_of_its_own(store: EventStore, pool: asyncpg.Pool):
    streams = [f"card-{n}" for n in range(40)]
    for stream_id in streams:
        await store.append(stream_id, 0, [ev(1), ev(2)])
    events = await store.read_all(limit=1000)
    assert sorted((e.stream_id, e.version) for e in events) == sorted((s, v) for s in streams for v in (1, 2))
    lanes = dict(zip(streams, await lanes_of(store, *streams), strict=True))
    assert {e.source for e in events} == set(lanes.values()) and len(set(lanes.values())) > 1
    for source in set(lanes.values()):
        assert [e.seq for e in events if e.source == source] == list(
            range(1, 2 * list(lanes.values()).count(source) + 1)
        )
    assert all(e.source == lanes[e.stream_id] for e in events)


async def test_a_later_append_commits_after_one_still_open_so_none_is_skipped(
    store: EventStore, pool: asyncpg.Pool, database_url: str
):
    late, early, elsewhere = await streams_in_lanes(store, 2, 1)
    held = await asyncpg.connect(database_url)
    try:
        transaction = held.transaction()
        await transaction.start()
        # This transaction takes the first seq of its lane; the next append there waits for it to end.
        await store.append(late, 0, [ev(1)], connection=held)
        waiting = asyncio.create_task(store.append(early, 0, [ev(2)]))
        async with asyncio.timeout(5):  # another lane: it does not wait
            await store.append(elsewhere, 0, [ev(3)])
        await asyncio.sleep(0.3)
        assert not waiting.done(), "an append must wait for the open transaction that holds its lane's previous seq"
        assert [e.stream_id for e in await store.read_all()] == [elsewhere]
        await transaction.commit()
        await waiting
    finally:
        await held.close()
    seen = [e for e in await store.read_all() if e.stream_id != elsewhere]
    assert [(e.stream_id, e.seq) for e in seen] == [(late, 1), (early, 2)]
    checkpoint = START
    collected = []
    while batch := await store.read_all(after=checkpoint, limit=1):
        collected += batch
        checkpoint = checkpoint.past(batch)
    assert sorted(e.stream_id for e in collected) == sorted([late, early, elsewhere])
    assert [e.stream_id for e in collected if e.stream_id != elsewhere] == [late, early]


async def test_a_rolled_back_append_leaves_no_gap(store: EventStore, pool: asyncpg.Pool):
    gone, kept = await streams_in_lanes(store, 2)
    async with pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        await store.append(gone, 0, [ev(1)], connection=connection)
        await transaction.rollback()
    await store.append(kept, 0, [ev(2)])
    [event] = await store.read_all()
    assert (event.stream_id, event.seq) == (kept, 1)


async def test_a_long_transaction_elsewhere_does_not_hold_readers_back(
    store: EventStore, server_url: str, database_url: str
):
    """A transaction left open in another database, or in this one without appending, holds an
    xid below every later one: readers that waited for the oldest open transaction stalled on it."""
    other_database = await asyncpg.connect(server_url)
    this_database = await asyncpg.connect(database_url)
    try:
        for connection in (other_database, this_database):
            await connection.execute("begin")
            await connection.fetchval("select pg_current_xact_id()")  # takes a transaction id and keeps it
        await store.append("a", 0, [ev(1)])
        await store.append("b", 0, [ev(2)])
        assert sorted(e.stream_id for e in await store.read_all()) == ["a", "b"]
    finally:
        await other_database.close()
        await this_database.close()


async def test_appends_in_repeatable_read_are_refused(store: EventStore, pool: asyncpg.Pool):
    """The seq is read under the source's lock; a snapshot taken before it could miss the last one."""
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read"):
        with pytest.raises(asyncpg.RaiseError, match="READ COMMITTED"):
            await store.append("s", 0, [ev(1)], connection=connection)


async def test_snapshots_keep_only_the_newest(store: EventStore):
    await store.save_snapshots([Snapshot("s1", 200, b"h2", b'{"v":2}'), Snapshot("s2", 100, b"h3", b'{"v":3}')])
    await store.save_snapshots([Snapshot("s1", 100, b"h1", b'{"v":1}')])
    assert await store.load_snapshot("s1") == (200, b"h2", b'{"v":2}')
    assert await store.load_snapshot("s2") == (100, b"h3", b'{"v":3}')
    assert await store.load_snapshot("other") is None


def test_verify_chain_of_nothing_is_the_genesis():
    assert verify_chain([]) == GENESIS_HASH


# ---- append_many: append for many streams in one statement ---------------------------------------


async def test_append_many_chains_each_stream_exactly_as_append_does(store: EventStore):
    single = await store.append("one", 0, [ev(1), ev(2)], metadata={"actor": "test"}, idempotency_key="k")
    hashes = await store.append_many(
        [StreamAppend("many-a", 0, [ev(1), ev(2)], idempotency_key="k"), StreamAppend("many-b", 0, [ev(3)])],
        metadata={"actor": "test"},
    )
    a, b = await store.read_stream("many-a"), await store.read_stream("many-b")
    assert hashes == [verify_chain(a), verify_chain(b)] and [e.version for e in a] == [1, 2]
    assert a[0].metadata == b[0].metadata == {"actor": "test"}
    one = await store.read_stream("one")
    assert [(e.type, e.data) for e in one] == [(e.type, e.data) for e in a]
    assert single != hashes[0]  # the stream id is part of what is hashed
    later = await store.append_many([StreamAppend("many-a", 2, [ev(4)], hashes[0], "k2")])
    assert later == [verify_chain(await store.read_stream("many-a"))]


async def test_append_many_puts_the_idempotency_key_on_each_streams_first_event(store: EventStore, pool):
    await store.append_many([StreamAppend("s1", 0, [ev(1), ev(2)], idempotency_key="k")])
    keys = await pool.fetch("select version, idempotency_key from events where stream_id = 's1' order by version")
    assert [(r["version"], r["idempotency_key"]) for r in keys] == [(1, "k"), (2, None)]


async def test_append_many_is_all_or_nothing_when_one_stream_moved(store: EventStore):
    last = await store.append("moved", 0, [ev(1)])
    await store.append("moved", 1, [ev(2)], previous_hash=last)
    with pytest.raises(ConcurrentUpdate):
        await store.append_many([StreamAppend("fresh", 0, [ev(1)]), StreamAppend("moved", 1, [ev(9)], last)])
    with pytest.raises(ConcurrentUpdate):
        await store.append_many([StreamAppend("fresh", 0, [ev(1)]), StreamAppend("moved", 2, [ev(9)], b"\x00" * 32)])
    with pytest.raises(ConcurrentUpdate):  # a new stream that already exists
        await store.append_many([StreamAppend("fresh", 0, [ev(1)]), StreamAppend("moved", 0, [ev(9)])])
    assert await store.read_stream("fresh") == []
    assert len(await store.read_stream("moved")) == 2


async def test_append_many_inside_a_transaction_rolls_back_only_its_own_rows(store: EventStore, pool):
    async with pool.acquire() as connection, connection.transaction():
        await store.append_many([StreamAppend("kept", 0, [ev(1)])], connection=connection)
        with pytest.raises(ConcurrentUpdate):
            await store.append_many([StreamAppend("kept", 0, [ev(2)])], connection=connection)
    assert len(await store.read_stream("kept")) == 1


async def test_append_many_takes_each_stream_once(store: EventStore):
    with pytest.raises(ValueError, match="at most once"):
        await store.append_many([StreamAppend("s1", 0, [ev(1)]), StreamAppend("s1", 1, [ev(2)])])


@pytest.mark.single_server("the group commit's statement on Citus is a function run on each shard's worker")
async def test_the_group_commit_checks_each_stream_by_an_index_probe_even_planned_on_a_small_table(
    store: EventStore, pool: asyncpg.Pool
):
    # A connection keeps a generic plan made while the table was small: a guard planned then as a
    # hashed subplan would read every event on every commit ever after.
    await store.append_each([OneEvent(f"s{n}", 0, ev(n), GENESIS_HASH, b"h" * 32, None, None) for n in range(2000)])
    async with pool.acquire() as connection:
        await connection.execute("analyze events")
        await connection.execute("set plan_cache_mode = force_generic_plan")
        await connection.execute(f"prepare append_each(jsonb) as {_APPEND_EACH}")
        document = _append_each_document([OneEvent("s1", 1, ev(2), b"h" * 32, b"i" * 32, None, None)])
        literal = document.replace("'", "''")
        plan = "\n".join(r[0] for r in await connection.fetch(f"explain execute append_each('{literal}')"))
    assert "hashed SubPlan" not in plan
    assert "Index Scan using events_stream_id_version_key" in plan


@pytest.mark.single_server("a Citus worker plans each shard's read on its own")
async def test_catching_cards_up_reads_each_stream_by_its_key_even_planned_before_any_statistics(
    store: EventStore, pool: asyncpg.Pool
):
    # Several workers catch their cached cards up with this read. Planned as a plain join before the
    # table's first ANALYZE (a new deployment), it hashed the streams and scanned every event, on
    # every read, for as long as the connection kept that plan.
    await pool.execute("alter table events set (autovacuum_enabled = false)")  # no ANALYZE during the test
    await store.append_each([OneEvent(f"s{n}", 0, ev(n), GENESIS_HASH, b"h" * 32, None, None) for n in range(2000)])
    async with pool.acquire() as connection:
        never_analyzed = await connection.fetchval("select reltuples < 0 from pg_class where relname = 'events'")
        assert never_analyzed
        await connection.execute("set plan_cache_mode = force_generic_plan")
        await connection.execute(f"prepare tails(text[], int[]) as {_READ_STREAMS_AFTER}")
        plan = "\n".join(r[0] for r in await connection.fetch("explain execute tails('{s1,s2}', '{1,1}')"))
    assert "Seq Scan on events" not in plan
    assert "events_stream_id_version_key" in plan
