"""The event store: append-only, optimistic per stream, no global lock (asyncpg).

All of its SQL is in this file. ``append`` writes a stream's new events in one
statement guarded by ``unique (stream_id, version)``; ``read_stream`` returns a
stream in version order; ``read_all`` follows the global commit order and never
skips an event whose transaction commits after a newer one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import msgspec

from ledger.codec import canonical_json
from ledger.domain.errors import ConcurrentUpdate, InvalidRequest

GENESIS_HASH = b""


class NewEvent(NamedTuple):
    type: str
    data: bytes  # canonical JSON (see ledger.codec)


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

_COLUMNS = "position, tx::text::bigint as tx, stream_id, version, type, data::text as data, metadata::text as metadata, recorded_at, hash"

_READ_STREAM = f"""
select {_COLUMNS} from events
where stream_id = $1 and version >= $2 and ($3::timestamptz is null or recorded_at <= $3)
order by version
"""

# Only transactions older than every transaction still in flight are visible as a
# prefix of the commit order; anything at or above xmin may still gain a neighbour.
_READ_ALL = f"""
select {_COLUMNS} from events
where (tx, position) > ($1::text::xid8, $2)
  and tx < pg_snapshot_xmin(pg_current_snapshot())
order by tx, position
limit $3
"""

_metadata_decoder = msgspec.json.Decoder(dict[str, Any])
_metadata_encoder = msgspec.json.Encoder()


class EventStore:
    def __init__(self, pool: asyncpg.Pool, *, observe_append: Callable[[float], None] | None = None) -> None:
        self.pool = pool
        self.observe_append = observe_append

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
        args = (
            stream_id,
            expected_version,
            [e.type for e in events],
            [e.data.decode() for e in events],
            hashes,
            _metadata_encoder.encode(metadata or {}).decode(),
            idempotency_key,
            previous_hash,
        )
        started = time.perf_counter()
        try:
            if connection is None:
                rows = await self.pool.fetch(_APPEND, *args)
            else:
                rows = await connection.fetch(_APPEND, *args)
        except asyncpg.UniqueViolationError as e:
            raise ConcurrentUpdate(f"stream {stream_id} changed since version {expected_version}") from e
        except (asyncpg.UntranslatableCharacterError, asyncpg.InvalidTextRepresentationError) as e:
            raise InvalidRequest(f"request contains text PostgreSQL cannot store: {e.args[0]}") from e
        if len(rows) != len(events):
            raise ConcurrentUpdate(f"stream {stream_id} is not at version {expected_version}")
        if self.observe_append is not None:
            self.observe_append(time.perf_counter() - started)
        return last

    async def read_stream(
        self, stream_id: str, from_version: int = 1, until: datetime | None = None
    ) -> list[RecordedEvent]:
        rows = await self.pool.fetch(_READ_STREAM, stream_id, from_version, until)
        return [_recorded(row) for row in rows]

    async def read_all(
        self, after: Checkpoint = START, limit: int = 1000, *, connection: asyncpg.Connection | None = None
    ) -> list[RecordedEvent]:
        """Events after ``after`` in commit order; pass ``connection`` to read inside its transaction
        (a projection batch reads, applies and moves its checkpoint in one)."""
        if connection is None:
            rows = await self.pool.fetch(_READ_ALL, str(after.tx), after.position, limit)
        else:
            rows = await connection.fetch(_READ_ALL, str(after.tx), after.position, limit)
        return [_recorded(row) for row in rows]

    # ---- snapshots ----------------------------------------------------------

    async def save_snapshot(self, stream_id: str, version: int, hash_: bytes, state: bytes) -> None:
        await self.pool.execute(
            """
            insert into snapshots (stream_id, version, hash, state) values ($1, $2, $3, $4::jsonb)
            on conflict (stream_id) do update
                set version = excluded.version, hash = excluded.hash, state = excluded.state,
                    taken_at = clock_timestamp()
                where snapshots.version < excluded.version
            """,
            stream_id,
            version,
            hash_,
            state.decode(),
        )

    async def load_snapshot(self, stream_id: str) -> tuple[int, bytes, bytes] | None:
        row = await self.pool.fetchrow(
            "select version, hash, state::text as state from snapshots where stream_id = $1", stream_id
        )
        if row is None:
            return None
        return row["version"], row["hash"], row["state"].encode()


def _recorded(row: asyncpg.Record) -> RecordedEvent:
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
