"""The event store: append-only, optimistic per stream, no global lock (asyncpg).

All of its SQL is in this file. ``append`` writes a stream's new events in one
statement guarded by ``unique (stream_id, version)``; ``append_many`` does the same
for many streams at once (bulk issuance: one statement for a thousand cards);
``read_stream`` returns a stream in version order; ``read_all`` follows each source's
commit order (ledger.eventstore.commit_order) and never skips an event whose transaction commits late.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import msgspec

from ledger.domain.errors import ConcurrentUpdate, InvalidRequest
from ledger.domain.topics import event_name
from ledger.eventstore import commit_order
from ledger.eventstore.codec import decode_canonical
from ledger.eventstore.commit_order import START, Checkpoint
from ledger.postgres.database import acquire_for_commit
from ledger.postgres.distribution import is_distributed
from ledger.postgres.tenancy import ALL_TENANTS, DEFAULT_TENANT, current_scope, is_account, tenant_scope

GENESIS_HASH = b""


class NewEvent(NamedTuple):
    type: str
    data: bytes  # canonical JSON (see ledger.eventstore.codec)


class StreamAppend(NamedTuple):
    """One stream's share of an ``append_many``: the arguments ``append`` takes for it."""

    stream_id: str
    expected_version: int
    events: Sequence[NewEvent]
    previous_hash: bytes = GENESIS_HASH
    idempotency_key: str | None = None


class OneEvent(NamedTuple):
    """One stream's single new event for ``append_each``, its chain hash already computed."""

    stream_id: str
    expected_version: int
    event: NewEvent
    previous_hash: bytes
    hash: bytes
    idempotency_key: str | None
    metadata: dict[str, Any] | None
    # The store whose card this is: one statement may append the Debits of several stores.
    tenant: str = DEFAULT_TENANT


class Snapshot(NamedTuple):
    """A stream's state at ``version`` (``hash`` its last event's), for ``save_snapshots``."""

    stream_id: str
    version: int
    hash: bytes
    state: bytes
    tenant: str = DEFAULT_TENANT  # the store whose card it is, as OneEvent's


class KnownTail(NamedTuple):
    """The last event a reader holds of a stream, by version and hash."""

    stream_id: str
    version: int
    hash: bytes


class RecordedEvent(msgspec.Struct, frozen=True):
    position: int
    source: int  # where it was written: 0 on one server, its shard on Citus (see ledger.eventstore.commit_order)
    seq: int  # its place in its source's commit order
    stream_id: str
    version: int
    type: str
    data: bytes
    metadata: dict[str, Any]
    recorded_at: datetime
    hash: bytes
    # ``data`` decoded: the one decode its canonical bytes came from, handed on to whatever applies
    # the event (see ledger.eventstore.codec), so that no event is decoded twice. None where not decoded here.
    state: Any = None
    tenant: str = DEFAULT_TENANT  # the store whose event it is

    @property
    def name(self) -> str:
        """What the event is, whichever release stored it: ``type`` is what the row holds (and what
        its hash covers), which for older rows is a legacy topic (see ledger.domain.topics)."""
        return event_name(self.type)


class ChainBroken(Exception):
    """A stream's stored hashes do not follow from its events: something was altered or removed."""


def event_bytes(stream_id: str, version: int, type_: str, data: bytes) -> bytes:
    return b"%s\n%d\n%s\n%s" % (stream_id.encode(), version, type_.encode(), data)


def chain_hash(previous_hash: bytes, stream_id: str, version: int, type_: str, data: bytes) -> bytes:
    return hashlib.sha256(previous_hash + event_bytes(stream_id, version, type_, data)).digest()


def _stream_is_at(stream_id: str, version: str, previous_hash: str, tenant: str | None = None) -> str:
    """The append guard on one server, its one definition: the stream is at ``version`` with
    ``previous_hash`` as its last hash (any stream is at version 0), and with ``tenant``, its events
    are that store's. The arguments are SQL expressions. (On Citus, see _GUARDS_HELD.)

    The stream's key alone finds the row, and the hash and the store are tested on it, in the select
    list: no index but ``(stream_id, version)`` can serve the subquery, whatever the planner believes.
    With the store in its WHERE, a backend was seen under load ANDing the key's probe with a bitmap
    of every index entry of the store (``events_by_tenant``): a walk of the table per appended row,
    kept as long as that plan was (docs/benchmarks.md, "The collapse again"). A scalar subquery is
    never hashed either, which an EXISTS could be (every event read into a hash table)."""
    same_store = f" and p.tenant_id = {tenant}" if tenant else ""
    return (
        f"({version} = 0 or coalesce((select p.hash = {previous_hash}{same_store} from events p"
        f" where p.stream_id = {stream_id} and p.version = {version}), false))"
    )


# The same on one server and on Citus, where each names one stream and is routed to its shard.
_APPEND = f"""
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
select $1, $2 + e.ord, e.type, e.data::jsonb, $6::jsonb, e.hash, case when e.ord = 1 then $7 end
from unnest($3::text[], $4::text[], $5::bytea[]) with ordinality as e(type, data, hash, ord)
where {_stream_is_at("$1", "$2", "$8")}
order by e.ord
returning position
"""

# The usual case, one event (a card command appends one): the same guard and the same version and
# idempotency rules as _APPEND, as a plain one-row insert, with no arrays to encode or unnest.
_APPEND_ONE = f"""
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
select $1, $2 + 1, $3, $4::jsonb, $5::jsonb, $6, $7
where {_stream_is_at("$1", "$2", "$8")}
returning position
"""

_COLUMNS = (
    "position, source, seq, stream_id, version, type, data::text as data, metadata::text as metadata, recorded_at, hash,"
    " tenant_id"
)

_READ_STREAM = f"""
select {_COLUMNS} from events
where stream_id = $1 and version >= $2 and ($3::timestamptz is null or recorded_at <= $3)
order by version
"""

# One field of the event in a stream that recorded a given transaction (its data's transaction_id).
# The (stream_id, version) key narrows the scan to the one stream; the filter reads only its rows.
_READ_TRANSACTION_FIELD = """
select (data -> $4)::text from events
where stream_id = $1 and type = any($2::text[]) and data ->> 'transaction_id' = $3
order by version
limit 1
"""

# Many streams' tails at once: each stream's events from the version given for it, that version's
# own event included so that its hash can be compared with the one the caller knows.
# Each stream is read on its own, by its key: a lateral subquery with an ORDER BY of its own is not
# merged into the join, so it stays a nested loop whatever the planner believes. As a plain join, a
# plan made while the table had no statistics yet (a new deployment's first minute) hashed the
# streams and scanned the whole table each time, 2 ms a read and growing, kept by every connection's
# prepared statement until the table was analyzed (docs/benchmarks.md, "Two workers").
_READ_STREAMS_AFTER = f"""
select tail.* from unnest($1::text[], $2::int[]) as after(sid, known)
cross join lateral (
    select {_COLUMNS} from events where stream_id = after.sid and version >= after.known order by version
) tail
order by tail.stream_id, tail.version
"""

_metadata_decoder = msgspec.json.Decoder(dict[str, Any])
_metadata_encoder = msgspec.json.Encoder()


class EventStore:
    """The event store on whichever backend holds the events: one PostgreSQL server or a Citus
    cluster, asked once, at the first call that depends on it (see ``backend``). What differs
    between the two is in ``OneServerBackend`` and ``CitusBackend``; what is the same is here."""

    def __init__(self, pool: asyncpg.Pool, *, observe_append: Callable[[float], None] | None = None) -> None:
        self.pool = pool
        self.observe_append = observe_append
        self._backend: OneServerBackend | None = None

    async def backend(self) -> OneServerBackend:
        if self._backend is None:
            self._backend = CitusBackend(self.pool) if await is_distributed(self.pool) else OneServerBackend(self.pool)
        return self._backend

    async def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[NewEvent],
        *,
        previous_hash: bytes = GENESIS_HASH,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        connection: asyncpg.Connection | None = None,
    ) -> bytes:
        """Appends ``events`` after ``expected_version`` and returns the stream's new last hash.

        ``previous_hash`` is the hash of the event at ``expected_version``; the insert only
        happens if the stored one matches, so a writer cannot chain onto a stream it has
        not read, nor leave a gap. A lost race raises ``ConcurrentUpdate``.
        """
        hashes: list[bytes] = []
        last = previous_hash
        for offset, new in enumerate(events, start=1):
            last = chain_hash(last, stream_id, expected_version + offset, new.type, new.data)
            hashes.append(last)
        metadata_json = _metadata_encoder.encode(metadata or {}).decode()
        if len(events) == 1:
            statement = _APPEND_ONE
            args = (stream_id, expected_version, events[0].type, events[0].data.decode(), metadata_json, last)
        else:
            statement = _APPEND
            types, datas = [e.type for e in events], [e.data.decode() for e in events]
            args = (stream_id, expected_version, types, datas, hashes, metadata_json)
        args += (idempotency_key, previous_hash)
        started = time.perf_counter()
        try:
            if connection is None:
                async with acquire_for_commit(self.pool) as own:
                    rows = await own.fetch(statement, *args)
            else:
                rows = await connection.fetch(statement, *args)
        except asyncpg.UniqueViolationError as e:
            raise ConcurrentUpdate(f"stream {stream_id} changed since version {expected_version}") from e
        except (asyncpg.UntranslatableCharacterError, asyncpg.InvalidTextRepresentationError) as e:
            raise InvalidRequest(f"request contains text PostgreSQL cannot store: {e.args[0]}") from e
        if len(rows) != len(events):
            raise ConcurrentUpdate(f"stream {stream_id} is not at version {expected_version}")
        if self.observe_append is not None:
            self.observe_append(time.perf_counter() - started)
        return last

    async def append_each(self, appends: Sequence[OneEvent]) -> set[str]:
        """Appends one event to each stream in one statement and one commit; returns the streams
        appended. A stream missing from the answer lost its race: its event was not written."""
        if len({a.stream_id for a in appends}) != len(appends):
            raise ValueError("append_each takes each stream at most once per call")
        backend = await self.backend()
        started = time.perf_counter()
        try:
            appended = await backend.append_each(appends)
        except (asyncpg.UntranslatableCharacterError, asyncpg.InvalidTextRepresentationError) as e:
            raise InvalidRequest(f"request contains text PostgreSQL cannot store: {e.args[0]}") from e
        if self.observe_append is not None:
            self.observe_append(time.perf_counter() - started)
        return appended

    async def shards_of(self, stream_ids: Sequence[str]) -> dict[str, int]:
        """The shard of events holding each stream: on Citus its shard id, on one server 0 for all."""
        return await (await self.backend()).shards_of(stream_ids)

    async def append_many(
        self,
        appends: Sequence[StreamAppend],
        *,
        metadata: dict[str, Any] | None = None,
        connection: asyncpg.Connection | None = None,
    ) -> list[bytes]:
        """``append`` for many streams in one statement; returns each stream's new last hash, in order.

        Each stream is guarded and chained exactly as ``append`` does it, and its idempotency
        key goes on its first event. All or nothing: if any stream is not where its entry
        expects, nothing of the call is kept (a savepoint inside the caller's transaction).
        """
        if len({a.stream_id for a in appends}) != len(appends):
            raise ValueError("append_many takes each stream at most once per call")
        columns = _append_many_columns(appends)
        args = (*columns.arrays(), _metadata_encoder.encode(metadata or {}).decode())
        backend = await self.backend()
        started = time.perf_counter()
        try:
            if connection is None:
                async with acquire_for_commit(self.pool) as own:
                    await _append_many_or_nothing(backend, own, appends, args, len(columns.types))
            else:
                await _append_many_or_nothing(backend, connection, appends, args, len(columns.types))
        except asyncpg.UniqueViolationError as e:
            raise ConcurrentUpdate(f"one of {len(appends)} streams changed while being appended to") from e
        except (asyncpg.UntranslatableCharacterError, asyncpg.InvalidTextRepresentationError) as e:
            raise InvalidRequest(f"request contains text PostgreSQL cannot store: {e.args[0]}") from e
        if self.observe_append is not None:
            self.observe_append(time.perf_counter() - started)
        return columns.last_hashes

    async def read_stream(
        self, stream_id: str, from_version: int = 1, until: datetime | None = None
    ) -> list[RecordedEvent]:
        rows = await self.pool.fetch(_READ_STREAM, stream_id, from_version, until)
        return [recorded_event(row) for row in rows]

    async def read_transaction_field(
        self, stream_id: str, types: Sequence[str], transaction_id: str, field: str
    ) -> bytes | None:
        """``field`` of the event (one of ``types``) that recorded ``transaction_id`` in the stream, as JSON
        text; None when no such event exists (JSON ``null`` when the event holds the field as null)."""
        text = await self.pool.fetchval(_READ_TRANSACTION_FIELD, stream_id, list(types), transaction_id, field)
        return None if text is None else text.encode()

    async def read_streams_after(self, known: Sequence[KnownTail]) -> dict[str, list[RecordedEvent] | None]:
        """For each stream's known last event, the events after it, in one query.

        A stream with nothing newer maps to an empty list. A stream that no longer holds the
        event the caller knows (its state came from a primary that was lost before that event
        reached the standby now promoted) maps to None: the caller must reload it whole.
        """
        rows = await self.pool.fetch(_READ_STREAMS_AFTER, [k.stream_id for k in known], [k.version for k in known])
        hash_known = {k.stream_id: (k.version, k.hash) for k in known}
        tails: dict[str, list[RecordedEvent] | None] = dict.fromkeys(hash_known)
        for row in rows:
            stream_id = row["stream_id"]
            if row["version"] == hash_known[stream_id][0]:
                tails[stream_id] = [] if row["hash"] == hash_known[stream_id][1] else None
            elif tails[stream_id] is not None:
                tails[stream_id].append(recorded_event(row))
        return tails

    async def read_all(
        self, after: Checkpoint = START, limit: int = 1000, *, connection: asyncpg.Connection | None = None
    ) -> list[RecordedEvent]:
        """The next events after ``after`` in each source's commit order (see ledger.eventstore.commit_order);
        pass ``connection`` to read inside its transaction."""
        return await (await self.backend()).read_all(after, limit, connection or self.pool)

    async def head(self, connection: asyncpg.Connection | asyncpg.Pool | None = None) -> Checkpoint:
        """Where a reader that has read every committed event stands."""
        return await (await self.backend()).head(connection or self.pool)

    async def next_recorded_at(
        self, after: Checkpoint, connection: asyncpg.Connection | asyncpg.Pool | None = None
    ) -> datetime | None:
        """When the oldest event after ``after`` was recorded; None when there is none."""
        return await (await self.backend()).next_recorded_at(after, connection or self.pool)

    async def source_of(self, stream_id: str) -> int:
        """The source a stream's events are written to: its lane on one server, its shard on Citus."""
        return await (await self.backend()).source_of(stream_id)

    async def sources(self, connection: asyncpg.Connection | asyncpg.Pool | None = None) -> Sequence[int]:
        """Where events are written (see ledger.eventstore.commit_order)."""
        return await (await self.backend()).sources(connection or self.pool)

    # ---- snapshots ----------------------------------------------------------

    async def save_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        """Stores each as its stream's snapshot, unless the stream's stored one is as recent: one
        transaction, whatever stores they are of (each row names its own, as a group commit's)."""
        with tenant_scope(ALL_TENANTS):
            async with acquire_for_commit(self.pool) as connection, connection.transaction():
                await connection.executemany(_SAVE_SNAPSHOT, snapshots)

    async def load_snapshot(self, stream_id: str) -> tuple[int, bytes, bytes] | None:
        row = await self.pool.fetchrow("select version, hash, state from snapshots where stream_id = $1", stream_id)
        if row is None:
            return None
        return row["version"], row["hash"], row["state"]


def _store_named(scope: str) -> str:
    """The store a row written in ``scope`` (an SQL expression) belongs to, in a statement run for
    every store: the account the scope names, or the default tenant where it names none (no scope,
    or every store's), as the tables' column defaults have it."""
    return f"coalesce(nullif(nullif({scope}, ''), '*'), default_tenant())"


# excluded.taken_at is the column's default, clock_timestamp(), taken for the new row: Citus
# refuses a volatile function in DO UPDATE SET on a distributed table.
_SAVE_SNAPSHOT = f"""
insert into snapshots (stream_id, version, hash, state, tenant_id)
values ($1, $2, $3, $4, {_store_named("$5")})
on conflict (stream_id) do update
    set version = excluded.version, hash = excluded.hash, state = excluded.state, taken_at = excluded.taken_at
    where snapshots.version < excluded.version and snapshots.tenant_id = excluded.tenant_id
"""

Reader = asyncpg.Connection | asyncpg.Pool


def one_tenant_in_scope() -> str | None:
    """The store a reader of the commit order is scoped to, when it is exactly one; else None
    (every store's work, a group commit's few stores, or no scope, which sees nothing)."""
    scope = current_scope()
    return scope if is_account(scope) else None


def _named(tenant: str | None) -> list[str]:
    """The tenant parameter of a commit-order statement: there only when the statement names one."""
    return [] if tenant is None else [tenant]


async def _append_many_or_nothing(
    backend: OneServerBackend,
    connection: asyncpg.Connection,
    appends: Sequence[StreamAppend],
    args: tuple[Any, ...],
    expected_rows: int,
) -> None:
    # A savepoint when the caller holds a transaction, a transaction otherwise: a guard that
    # fails for one stream must not leave the other streams' rows behind.
    async with connection.transaction():
        rows = await backend.append_many(connection, appends, args)
        if len(rows) != expected_rows:
            raise ConcurrentUpdate(
                f"{expected_rows - len(rows)} event(s) found their stream not at the expected version"
            )


# ---- one server ---------------------------------------------------------------

# append for many streams: every row carries its stream's expected version and previous hash, so
# each stream gets the very guard _APPEND gives one. A stream may appear once per statement: the
# guard reads the table as it was before the statement, not the rows the statement inserts.
_APPEND_MANY = f"""
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
select e.stream_id, e.version, e.type, e.data::jsonb, $9::jsonb, e.hash, e.idempotency_key
from unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::int[], $8::bytea[])
    as e(stream_id, version, type, data, hash, idempotency_key, expected_version, previous_hash)
where {_stream_is_at("e.stream_id", "e.expected_version", "e.previous_hash")}
order by event_lane(e.stream_id), e.stream_id, e.version
returning position
"""

# One event for each of many streams, each judged on its own: a row whose guard fails or that hits
# a unique key (a lost race, a reused idempotency key) is skipped, not an error, and the streams
# returned are the ones appended. This is what lets concurrent commands share one commit.
# Rows go in the order of their source (see ledger.eventstore.commit_order), then of their stream: two processes
# inserting into the same sources and streams then wait for each other in the same order, never in
# a cycle (a deadlock).
# The rows come as one JSON document (see _append_each_document), each event's data inside it as the
# very JSON its hash covers: one parameter to encode, where nine arrays cost asyncpg a type check of
# every element (a Python-level isinstance against an abstract base class, about 70 a statement).
# Each row is its store's, and may extend only a stream of that store: the statement runs in every
# store's scope (one set_config fewer per commit than a scope of exactly its stores, which changes
# with nearly every group when many stores write, and which, made of the rows' own tenants, checked
# nothing a row could not claim), so the guard compares the stream's tenant with the row's.
_APPEND_EACH = f"""
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key, tenant_id)
select r.stream_id, r.expected + 1, r.type, r.data, r.metadata, decode(r.hash, 'hex'), r.key, r.tenant
from (
    select r.*, {_store_named("r.tenant_named")} as tenant
    from jsonb_to_recordset($1::jsonb)
        as r(stream_id text, expected int, type text, data jsonb, metadata jsonb, hash text, key text, previous text,
             tenant_named text)
) r
where {_stream_is_at("r.stream_id", "r.expected", "decode(r.previous, 'hex')", "r.tenant")}
order by event_lane(r.stream_id), r.stream_id
on conflict do nothing
returning stream_id
"""


class _AppendEachRow(msgspec.Struct):
    """One row of _APPEND_EACH's document: its columns, by name."""

    stream_id: str
    expected: int
    type: str
    data: msgspec.Raw  # the event's canonical JSON, as it is: not a string to escape and parse back
    metadata: dict[str, Any]
    hash: str  # hex
    key: str | None
    previous: str  # hex
    tenant_named: str


_document_encoder = msgspec.json.Encoder()


def _append_each_document(appends: Sequence[OneEvent]) -> str:
    return _document_encoder.encode(
        [
            _AppendEachRow(
                a.stream_id,
                a.expected_version,
                a.event.type,
                msgspec.Raw(a.event.data),
                a.metadata or {},
                a.hash.hex(),
                a.idempotency_key,
                a.previous_hash.hex(),
                a.tenant,
            )
            for a in appends
        ]
    ).decode()


_LANE_OF = "select event_lane($1)"


class OneServerBackend:
    """The events on one PostgreSQL server: a source is a lane (see ledger.eventstore.commit_order), and every
    statement runs on the one server."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._lanes: Sequence[int] | None = None  # learnt at the first read: one server's lanes never change

    async def append_each(self, appends: Sequence[OneEvent]) -> set[str]:
        # Several stores' rows in one statement: each names its tenant, and the guard holds each to
        # its stream's (see _APPEND_EACH).
        with tenant_scope(ALL_TENANTS):
            async with acquire_for_commit(self.pool) as connection:
                rows = await connection.fetch(_APPEND_EACH, _append_each_document(appends))
        return {row["stream_id"] for row in rows}

    async def shards_of(self, stream_ids: Sequence[str]) -> dict[str, int]:
        return dict.fromkeys(stream_ids, 0)  # one shard

    async def append_many(
        self, connection: asyncpg.Connection, appends: Sequence[StreamAppend], args: tuple[Any, ...]
    ) -> list[asyncpg.Record]:
        """The rows of ``args`` (see _APPEND_MANY) whose stream's guard holds, inserted."""
        return await connection.fetch(_APPEND_MANY, *args)

    # Readers of the commit order: in one store's scope they name it (see ledger.eventstore.commit_order).
    async def read_all(self, after: Checkpoint, limit: int, reader: Reader) -> list[RecordedEvent]:
        tenant = one_tenant_in_scope()
        arguments = commit_order.after_arguments(after, await self.sources(reader))
        statement = commit_order.read_after_statement(_COLUMNS, len(arguments) // 2, one_tenant=tenant is not None)
        rows = await reader.fetch(statement, limit, *arguments, *_named(tenant))
        return [recorded_event(row) for row in rows]

    async def head(self, reader: Reader) -> Checkpoint:
        tenant = one_tenant_in_scope()
        found = await self.sources(reader)
        statement = commit_order.heads_statement(len(found), one_tenant=tenant is not None)
        rows = await reader.fetch(statement, *found, *_named(tenant))
        return Checkpoint.of({row["source"]: row["seq"] for row in rows})

    async def next_recorded_at(self, after: Checkpoint, reader: Reader) -> datetime | None:
        tenant = one_tenant_in_scope()
        arguments = commit_order.after_arguments(after, await self.sources(reader))
        statement = commit_order.next_after_statement(len(arguments) // 2, one_tenant=tenant is not None)
        return await reader.fetchval(statement, *arguments, *_named(tenant))

    async def source_of(self, stream_id: str) -> int:
        return await self.pool.fetchval(_LANE_OF, stream_id)

    async def sources(self, reader: Reader) -> Sequence[int]:
        if self._lanes is None:
            self._lanes = await commit_order.lanes(reader)
        return self._lanes


# ---- Citus ----------------------------------------------------------------------

# append_many on Citus, where a subquery correlated with unnest's rows cannot be planned: the guard
# is checked first (_GUARDS_HELD), in the same transaction, and the rows inserted as given. Checked then inserted is as safe as one statement: an event, once there, never
# changes, and a writer who appended meanwhile makes the insert hit unique (stream_id, version).
_APPEND_MANY_CHECKED = """
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
select e.stream_id, e.version, e.type, e.data::jsonb, $9::jsonb, e.hash, e.idempotency_key
from unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::int[], $8::bytea[])
    as e(stream_id, version, type, data, hash, idempotency_key, expected_version, previous_hash)
order by e.stream_id, e.version
returning position
"""
# The guard on Citus for many streams at once, as one join the coordinator can plan: how many of
# the streams are at their expected version with their previous hash. ledger.postgres.distribution's
# append_events checks the same one stream at a time on a shard's worker; one shared definition
# (a function called per row) made a bulk issuance's check of 1000 streams 0.7 s instead of 0.05 s.
_GUARDS_HELD = """
select count(*) from events p, unnest($1::text[], $2::int[], $3::bytea[]) as g(stream_id, version, hash)
where p.stream_id = g.stream_id and p.version = g.version and p.hash = g.hash
"""

# append_each on Citus for streams that share a shard: ledger.postgres.distribution's append_events, run on
# that shard's worker ($1, any of the streams, routes the call), one local transaction for them all.
# Every array goes as text[]: asyncpg knows only text[] and oid[] of its own and looks any other
# array type up on each new connection, a catalog query that took seconds on a loaded coordinator.
_APPEND_ON_ONE_SHARD = (
    "select append_events($1, $2, $3::text[]::integer[], $4, $5, $6, $7::text[]::bytea[], $8, $9::text[]::bytea[], $10)"
)

# Which shard of events holds each stream: Citus's own hash of the id against its shard ranges,
# answered from the coordinator's metadata, no worker asked.
_SHARDS_OF = "select s, get_shard_id_for_distribution_column('events', s) from unnest($1::text[]) as s"
# Streams whose shard is remembered (a card's shard never changes while shards only move; after a
# split a stale entry only costs speed: see CitusBackend.append_each). Forgotten all at once past this.
SHARDS_REMEMBERED_MAX = 100_000

# The commit order on Citus, read on the worker of each shard (ledger.postgres.distribution's source_events
# and source_head, routed by their first argument; see CitusBackend._routes_to).
# Each takes the reader's tenant scope last: it runs on the worker, where the coordinator's session is not.
_SOURCE_EVENTS = f"select {_COLUMNS} from source_events($1, $2, $3, $4, $5)"
_SOURCE_HEAD = "select source_head($1, $2, $3)"
_SOURCE_NEXT_AT = "select recorded_at from source_events($1, $2, $3, 1, $4)"
# A batch reads at most this many rounds of shares (a round: a call per shard, side by side): one
# when every shard has events to give, one more each time those that gave fewer leave their part.
READ_ROUNDS_MAX = 4
# Rounds of candidate keys tried before a shard is read by the one statement instead (see _routes_to).
ROUTE_ROUNDS_MAX = 8


class CitusBackend(OneServerBackend):
    """The events distributed by stream on a Citus cluster: a source is a shard of events, and a
    card's writes and a shard's reads run on the worker that holds it. Where a call cannot be sent
    to one worker (inside a transaction), it is one server's statement, run across the shards."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self._shard_of: dict[str, int] = {}  # stream id -> shard id of events
        self._route_of: dict[int, str] = {}  # shard id -> a key of that shard (see _routes_to)

    async def append_each(self, appends: Sequence[OneEvent]) -> set[str]:
        """One call per shard, side by side: each is one local transaction on the shard's worker (one
        statement for all would be a transaction across shards and workers, committed in two
        phases). Were a shard split since its streams were looked up, a call would still be right,
        only slower: the worker would then run it across shards itself."""
        shard_of = await self.shards_of([a.stream_id for a in appends])
        by_shard: dict[tuple[int, str], list[OneEvent]] = {}
        for a in sorted(appends, key=lambda a: a.stream_id):  # stream order, as _APPEND_EACH: no deadlock
            # A call per store too: the shard's function writes the tenant in scope on every row.
            by_shard.setdefault((shard_of[a.stream_id], a.tenant), []).append(a)

        async def one_shard(group: list[OneEvent]) -> list[str]:
            with tenant_scope(group[0].tenant):
                return await self._append_on_one_shard(group)

        answers = await asyncio.gather(*map(one_shard, by_shard.values()))
        return {stream_id for appended in answers for stream_id in appended}

    async def _append_on_one_shard(self, group: list[OneEvent]) -> list[str]:
        async with acquire_for_commit(self.pool) as connection:
            return await connection.fetchval(
                _APPEND_ON_ONE_SHARD,
                group[0].stream_id,
                [a.stream_id for a in group],
                [str(a.expected_version) for a in group],
                [a.event.type for a in group],
                [a.event.data.decode() for a in group],
                [_metadata_encoder.encode(a.metadata or {}).decode() for a in group],
                ["\\x" + a.hash.hex() for a in group],
                [a.idempotency_key for a in group],
                ["\\x" + a.previous_hash.hex() for a in group],
                current_scope(),
            )

    async def shards_of(self, stream_ids: Sequence[str]) -> dict[str, int]:
        """Its shard id for each stream: one query for the ones not remembered yet."""
        unknown = [s for s in stream_ids if s not in self._shard_of]
        if unknown:
            if len(self._shard_of) + len(unknown) > SHARDS_REMEMBERED_MAX:
                self._shard_of.clear()
            self._shard_of.update(await self.pool.fetch(_SHARDS_OF, unknown))
        return {s: self._shard_of[s] for s in stream_ids}

    async def append_many(
        self, connection: asyncpg.Connection, appends: Sequence[StreamAppend], args: tuple[Any, ...]
    ) -> list[asyncpg.Record]:
        guarded = [a for a in appends if a.expected_version > 0]
        if guarded:
            held = await connection.fetchval(
                _GUARDS_HELD,
                [a.stream_id for a in guarded],
                [a.expected_version for a in guarded],
                [a.previous_hash for a in guarded],
            )
            if held != len(guarded):
                raise ConcurrentUpdate(f"{len(guarded) - held} stream(s) not at the expected version")
        return await connection.fetch(_APPEND_MANY_CHECKED, *args)

    async def read_all(self, after: Checkpoint, limit: int, reader: Reader) -> list[RecordedEvent]:
        routes = await self._routes_to(reader, await self.sources(reader), after)
        if routes is None:
            return await super().read_all(after, limit, reader)
        return await self._read_shard_by_shard(reader, after, limit, routes)

    async def _read_shard_by_shard(
        self, pool: asyncpg.Pool, after: Checkpoint, limit: int, routes: dict[int, str]
    ) -> list[RecordedEvent]:
        """Every shard's share read on its own worker, side by side, then merged in (seq, source)
        order. A share is an equal part of ``limit``; the shards that had as much as they were asked
        for share what the others left, in another call each."""
        after_seq = {source: after.seq(source) for source in routes}
        rows: list[asyncpg.Record] = []
        wanting = list(routes)
        for _ in range(READ_ROUNDS_MAX):
            share = -(-(limit - len(rows)) // len(wanting))
            answers = await asyncio.gather(
                *(pool.fetch(_SOURCE_EVENTS, routes[s], s, after_seq[s], share, current_scope()) for s in wanting)
            )
            full = []
            for source, found in zip(wanting, answers, strict=True):
                rows += found
                if len(found) == share:
                    after_seq[source] = found[-1]["seq"]
                    full.append(source)
            wanting = full
            if not wanting or len(rows) >= limit:
                break
        rows.sort(key=lambda row: (row["seq"], row["source"]))
        return [recorded_event(row) for row in rows[:limit]]

    async def head(self, reader: Reader) -> Checkpoint:
        found = await self.sources(reader)
        routes = await self._routes_to(reader, found)
        if routes is None:
            return await super().head(reader)
        seqs = await asyncio.gather(*(reader.fetchval(_SOURCE_HEAD, routes[s], s, current_scope()) for s in found))
        return Checkpoint.of({source: seq for source, seq in zip(found, seqs, strict=True) if seq is not None})

    async def next_recorded_at(self, after: Checkpoint, reader: Reader) -> datetime | None:
        found = await self.sources(reader)
        routes = await self._routes_to(reader, found, after)
        if routes is None:
            return await super().next_recorded_at(after, reader)
        scope = current_scope()
        recorded = await asyncio.gather(
            *(reader.fetchval(_SOURCE_NEXT_AT, routes[s], s, after.seq(s), scope) for s in found)
        )
        return min((at for at in recorded if at is not None), default=None)

    async def _routes_to(
        self, reader: Reader, shards: Sequence[int], after: Checkpoint = START
    ) -> dict[int, str] | None:
        """For each of ``shards``, a key that routes a call of the source-reading functions
        (ledger.postgres.distribution's source_events, source_head) to the shard's worker. None where a read
        must be one statement instead: on a connection (a statement cannot run side by side with
        others there, and inside a transaction block Citus would not route the call); and where
        ``after`` names a source that is no shard any more (a shard split since); and in one store's
        scope, where the statement names the store, so each shard finds that store's rows by index
        (the functions read a source whole)."""
        if not isinstance(reader, asyncpg.Pool) or one_tenant_in_scope() is not None:
            return None
        if any(source not in shards for source, _ in after.seqs):
            return None
        missing = [s for s in shards if s not in self._route_of]
        tried = 0
        for _ in range(ROUTE_ROUNDS_MAX):
            if not missing:
                break
            # A shard holding 1/n of the hash range takes a key in about n tries.
            keys = [f"route-{i}" for i in range(tried, tried + 8 * len(shards))]
            tried += len(keys)
            for key, shard in await self.pool.fetch(_SHARDS_OF, keys):
                self._route_of.setdefault(shard, key)
            missing = [s for s in missing if s not in self._route_of]
        if missing:
            return None
        return {s: self._route_of[s] for s in shards}

    async def source_of(self, stream_id: str) -> int:
        return (await self.shards_of([stream_id]))[stream_id]

    async def sources(self, reader: Reader) -> Sequence[int]:
        """The shards, asked at each read: a cluster's may change (a split)."""
        return await commit_order.shards(reader)


class _AppendManyColumns(NamedTuple):
    """The rows of an ``append_many``, one list per column of its unnest, plus each stream's last hash."""

    stream_ids: list[str]
    versions: list[int]
    types: list[str]
    datas: list[str]
    hashes: list[bytes]
    idempotency_keys: list[str | None]
    expected_versions: list[int]
    previous_hashes: list[bytes]
    last_hashes: list[bytes]

    def arrays(self) -> tuple[list[Any], ...]:
        return self[:8]


def _append_many_columns(appends: Sequence[StreamAppend]) -> _AppendManyColumns:
    columns = _AppendManyColumns([], [], [], [], [], [], [], [], [])
    for a in appends:
        last = a.previous_hash
        for offset, new in enumerate(a.events, start=1):
            version = a.expected_version + offset
            last = chain_hash(last, a.stream_id, version, new.type, new.data)
            columns.stream_ids.append(a.stream_id)
            columns.versions.append(version)
            columns.types.append(new.type)
            columns.datas.append(new.data.decode())
            columns.hashes.append(last)
            columns.idempotency_keys.append(a.idempotency_key if offset == 1 else None)
            columns.expected_versions.append(a.expected_version)
            columns.previous_hashes.append(a.previous_hash)
        columns.last_hashes.append(last)
    return columns


def recorded_event(
    row: asyncpg.Record, *, data: bytes | None = None, metadata: dict[str, Any] | None = None
) -> RecordedEvent:
    """A row selected with the event columns (see ``_COLUMNS``), decoded; for readers outside the store
    too, who pass ``data`` or ``metadata`` when they decoded it already or did not select it."""
    state = None
    if data is None:
        state, data = decode_canonical(row["data"])
    return RecordedEvent(
        position=row["position"],
        source=row["source"],
        seq=row["seq"],
        stream_id=row["stream_id"],
        version=row["version"],
        type=row["type"],
        data=data,
        metadata=_metadata_decoder.decode(row["metadata"]) if metadata is None else metadata,
        recorded_at=row["recorded_at"],
        hash=row["hash"],
        state=state,
        tenant=row.get("tenant_id", DEFAULT_TENANT),
    )


def verify_chain(events: Sequence[RecordedEvent], previous_hash: bytes = GENESIS_HASH) -> bytes:
    """Checks versions are contiguous and each hash follows from its event; returns the last hash."""
    last = previous_hash
    for expected_version, event in enumerate(events, start=events[0].version if events else 1):
        if event.version != expected_version:
            raise ChainBroken(f"stream {event.stream_id}: version {expected_version} missing, found {event.version}")
        if chain_hash(last, event.stream_id, event.version, event.type, event.data) != event.hash:
            raise ChainBroken(f"stream {event.stream_id}: event at version {event.version} does not match its hash")
        last = event.hash
    return last
