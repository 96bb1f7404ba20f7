"""The event store: append-only, optimistic per stream, no global lock (asyncpg).

All of its SQL is in this file. ``append`` writes a stream's new events in one
statement guarded by ``unique (stream_id, version)``; ``append_many`` does the same
for many streams at once (bulk issuance: one statement for a thousand cards);
``read_stream`` returns a stream in version order; ``read_all`` follows the global
commit order and never skips an event whose transaction commits after a newer one.
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

from ledger.codec import canonical_json
from ledger.distribution import is_distributed
from ledger.domain.errors import ConcurrentUpdate, InvalidRequest

GENESIS_HASH = b""


class NewEvent(NamedTuple):
    type: str
    data: bytes  # canonical JSON (see ledger.codec)


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


class KnownTail(NamedTuple):
    """The last event a reader holds of a stream, by version and hash."""

    stream_id: str
    version: int
    hash: bytes


class RecordedEvent(msgspec.Struct, frozen=True):
    position: int
    tx: int
    stream_id: str
    version: int
    type: str
    data: bytes
    metadata: dict[str, Any]
    recorded_at: datetime
    hash: bytes

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.tx, self.position)


class Checkpoint(NamedTuple):
    """A place in the global order: the writing transaction, then the position inside it."""

    tx: int = 0
    position: int = 0


START = Checkpoint()


class ChainBroken(Exception):
    """A stream's stored hashes do not follow from its events: something was altered or removed."""


def event_bytes(stream_id: str, version: int, type_: str, data: bytes) -> bytes:
    return b"%s\n%d\n%s\n%s" % (stream_id.encode(), version, type_.encode(), data)


def chain_hash(previous_hash: bytes, stream_id: str, version: int, type_: str, data: bytes) -> bytes:
    return hashlib.sha256(previous_hash + event_bytes(stream_id, version, type_, data)).digest()


_APPEND = """
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
select $1, $2 + e.ord, e.type, e.data::jsonb, $6::jsonb, e.hash, case when e.ord = 1 then $7 end
from unnest($3::text[], $4::text[], $5::bytea[]) with ordinality as e(type, data, hash, ord)
where $2 = 0 or exists (select 1 from events where stream_id = $1 and version = $2 and hash = $8)
returning position
"""

# The usual case, one event (a card command appends one): the same guard and the same version and
# idempotency rules as _APPEND, as a plain one-row insert, with no arrays to encode or unnest.
_APPEND_ONE = """
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
select $1, $2 + 1, $3, $4::jsonb, $5::jsonb, $6, $7
where $2 = 0 or exists (select 1 from events where stream_id = $1 and version = $2 and hash = $8)
returning position
"""

# append for many streams: every row carries its stream's expected version and previous hash, so
# each stream gets the very guard _APPEND gives one. A stream may appear once per statement: the
# guard reads the table as it was before the statement, not the rows the statement inserts.
_APPEND_MANY = """
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
select e.stream_id, e.version, e.type, e.data::jsonb, $9::jsonb, e.hash, e.idempotency_key
from unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::int[], $8::bytea[])
    as e(stream_id, version, type, data, hash, idempotency_key, expected_version, previous_hash)
where e.expected_version = 0
   or exists (
       select 1 from events p
       where p.stream_id = e.stream_id and p.version = e.expected_version and p.hash = e.previous_hash
   )
returning position
"""

# _APPEND_MANY on Citus, where a subquery correlated with unnest's rows cannot be planned: the same
# guard is checked first (_GUARDS_HELD), in the same transaction, and the rows inserted as given.
# Checked then inserted is as safe as one statement: an event, once there, never changes, and a
# writer who appended meanwhile makes the insert hit unique (stream_id, version).
_APPEND_MANY_CHECKED = """
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
select e.stream_id, e.version, e.type, e.data::jsonb, $9::jsonb, e.hash, e.idempotency_key
from unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::int[], $8::bytea[])
    as e(stream_id, version, type, data, hash, idempotency_key, expected_version, previous_hash)
returning position
"""
_GUARDS_HELD = """
select count(*) from events p, unnest($1::text[], $2::int[], $3::bytea[]) as g(stream_id, version, hash)
where p.stream_id = g.stream_id and p.version = g.version and p.hash = g.hash
"""

# One event for each of many streams, each judged on its own: a row whose guard fails or that hits
# a unique key (a lost race, a reused idempotency key) is skipped, not an error, and the streams
# returned are the ones appended. This is what lets concurrent commands share one commit.
# Rows go in stream order: two processes inserting into the same streams then wait for each other
# in the same order, never in a cycle (a deadlock).
_APPEND_EACH = """
insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
select r.stream_id, r.expected + 1, r.type, r.data::jsonb, r.metadata::jsonb, r.hash, r.key
from unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::text[], $8::bytea[])
    as r(stream_id, expected, type, data, metadata, hash, key, previous)
where r.expected = 0
   or exists (select 1 from events e where e.stream_id = r.stream_id and e.version = r.expected and e.hash = r.previous)
order by r.stream_id
on conflict do nothing
returning stream_id
"""

# _APPEND_ONE as the function ledger.distribution installs on Citus, which runs on the card's worker.
_APPEND_ON_ITS_SHARD = "select append_event($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8)"

_COLUMNS = "position, tx::text::bigint as tx, stream_id, version, type, data::text as data, metadata::text as metadata, recorded_at, hash"

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
_READ_STREAMS_AFTER = f"""
select {_COLUMNS} from events, unnest($1::text[], $2::int[]) as after(sid, known)
where stream_id = after.sid and version >= after.known
order by stream_id, version
"""

# Only transactions older than every transaction still in flight are visible as a
# prefix of the commit order; anything at or above xmin may still gain a neighbour.
# The order names the table's columns: a bare ``tx`` would be the output column (tx::text::bigint),
# which no index has, so every batch would sort the whole table.
_READ_ALL = f"""
select {_COLUMNS} from events
where (tx, position) > ($1::text::xid8, $2)
  and tx < pg_snapshot_xmin(pg_current_snapshot())
order by events.tx, events.position
limit $3
"""

_metadata_decoder = msgspec.json.Decoder(dict[str, Any])
_metadata_encoder = msgspec.json.Encoder()


class EventStore:
    def __init__(self, pool: asyncpg.Pool, *, observe_append: Callable[[float], None] | None = None) -> None:
        self.pool = pool
        self.observe_append = observe_append
        self._sharded: bool | None = None  # events distributed by Citus; learnt at the first append_each

    async def sharded(self) -> bool:
        if self._sharded is None:
            self._sharded = await is_distributed(self.pool)
        return self._sharded

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
                rows = await self.pool.fetch(statement, *args)
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
        started = time.perf_counter()
        try:
            if await self.sharded():
                appended = await self._append_each_on_its_shard(appends)
            else:
                appended = await self._append_each_in_one_statement(appends)
        except (asyncpg.UntranslatableCharacterError, asyncpg.InvalidTextRepresentationError) as e:
            raise InvalidRequest(f"request contains text PostgreSQL cannot store: {e.args[0]}") from e
        if self.observe_append is not None:
            self.observe_append(time.perf_counter() - started)
        return appended

    async def _append_each_in_one_statement(self, appends: Sequence[OneEvent]) -> set[str]:
        rows = await self.pool.fetch(
            _APPEND_EACH,
            [a.stream_id for a in appends],
            [a.expected_version for a in appends],
            [a.event.type for a in appends],
            [a.event.data.decode() for a in appends],
            [_metadata_encoder.encode(a.metadata or {}).decode() for a in appends],
            [a.hash for a in appends],
            [a.idempotency_key for a in appends],
            [a.previous_hash for a in appends],
        )
        return {row["stream_id"] for row in rows}

    async def _append_each_on_its_shard(self, appends: Sequence[OneEvent]) -> set[str]:
        """On Citus, one statement a stream, side by side: each is a local transaction on the
        card's own shard (one statement for all would be a transaction across shards and workers)."""

        async def one(a: OneEvent) -> str | None:
            metadata_json = _metadata_encoder.encode(a.metadata or {}).decode()
            args = (a.stream_id, a.expected_version, a.event.type, a.event.data.decode(), metadata_json, a.hash)
            try:
                position = await self.pool.fetchval(_APPEND_ON_ITS_SHARD, *args, a.idempotency_key, a.previous_hash)
            except asyncpg.UniqueViolationError:  # a lost race or a reused key: skipped, as on conflict
                return None
            return None if position is None else a.stream_id

        return {stream_id for stream_id in await asyncio.gather(*map(one, appends)) if stream_id is not None}

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
        started = time.perf_counter()
        try:
            if connection is None:
                async with self.pool.acquire() as own:
                    await self._append_many(own, appends, args, len(columns.types))
            else:
                await self._append_many(connection, appends, args, len(columns.types))
        except asyncpg.UniqueViolationError as e:
            raise ConcurrentUpdate(f"one of {len(appends)} streams changed while being appended to") from e
        except (asyncpg.UntranslatableCharacterError, asyncpg.InvalidTextRepresentationError) as e:
            raise InvalidRequest(f"request contains text PostgreSQL cannot store: {e.args[0]}") from e
        if self.observe_append is not None:
            self.observe_append(time.perf_counter() - started)
        return columns.last_hashes

    async def _append_many(
        self,
        connection: asyncpg.Connection,
        appends: Sequence[StreamAppend],
        args: tuple[Any, ...],
        expected_rows: int,
    ) -> None:
        # A savepoint when the caller holds a transaction, a transaction otherwise: a guard that
        # fails for one stream must not leave the other streams' rows behind.
        async with connection.transaction():
            if await self.sharded():
                await _check_guards(connection, appends)
                rows = await connection.fetch(_APPEND_MANY_CHECKED, *args)
            else:
                rows = await connection.fetch(_APPEND_MANY, *args)
            if len(rows) != expected_rows:
                raise ConcurrentUpdate(
                    f"{expected_rows - len(rows)} event(s) found their stream not at the expected version"
                )

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
        """Events after ``after`` in commit order; pass ``connection`` to read inside its transaction
        (a projection batch reads, applies and moves its checkpoint in one)."""
        if connection is None:
            rows = await self.pool.fetch(_READ_ALL, str(after.tx), after.position, limit)
        else:
            rows = await connection.fetch(_READ_ALL, str(after.tx), after.position, limit)
        return [recorded_event(row) for row in rows]

    # ---- snapshots ----------------------------------------------------------

    async def save_snapshot(self, stream_id: str, version: int, hash_: bytes, state: bytes) -> None:
        # excluded.taken_at is the column's default, clock_timestamp(), taken for the new row:
        # Citus refuses a volatile function in DO UPDATE SET on a distributed table.
        await self.pool.execute(
            """
            insert into snapshots (stream_id, version, hash, state) values ($1, $2, $3, $4)
            on conflict (stream_id) do update
                set version = excluded.version, hash = excluded.hash, state = excluded.state,
                    taken_at = excluded.taken_at
                where snapshots.version < excluded.version
            """,
            stream_id,
            version,
            hash_,
            state,
        )

    async def load_snapshot(self, stream_id: str) -> tuple[int, bytes, bytes] | None:
        row = await self.pool.fetchrow("select version, hash, state from snapshots where stream_id = $1", stream_id)
        if row is None:
            return None
        return row["version"], row["hash"], row["state"]


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


async def _check_guards(connection: asyncpg.Connection, appends: Sequence[StreamAppend]) -> None:
    """Every stream that already has events is at its expected version with its previous hash."""
    guarded = [a for a in appends if a.expected_version > 0]
    if not guarded:
        return
    held = await connection.fetchval(
        _GUARDS_HELD,
        [a.stream_id for a in guarded],
        [a.expected_version for a in guarded],
        [a.previous_hash for a in guarded],
    )
    if held != len(guarded):
        raise ConcurrentUpdate(f"{len(guarded) - held} stream(s) not at the expected version")


def recorded_event(row: asyncpg.Record) -> RecordedEvent:
    """A row selected with the event columns (see ``_COLUMNS``), decoded; for readers outside the store too."""
    return RecordedEvent(
        position=row["position"],
        tx=row["tx"],
        stream_id=row["stream_id"],
        version=row["version"],
        type=row["type"],
        data=canonical_json(row["data"]),
        metadata=_metadata_decoder.decode(row["metadata"]),
        recorded_at=row["recorded_at"],
        hash=row["hash"],
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
