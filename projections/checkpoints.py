"""Checkpoints and the lock that makes one projection advance in one place at a time.

All of the checkpoint SQL is here. A batch takes ``pg_try_advisory_xact_lock`` on its
projection (a second runner skips instead of waiting), and moves the checkpoint with a
compare-and-set on the position it started from: even without the lock, two batches that
started from the same checkpoint could not both commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg
import msgspec

from ledger.eventstore.commit_order import Checkpoint
from ledger.eventstore.store import EventStore, RecordedEvent

# Advisory lock namespaces (the two-int4 form; the second key is hashtext(projection name)).
BATCH_LOCK_CLASS = 0x70726F6A  # "proj": held by the transaction applying a batch, or swapping a rebuild in
REBUILD_LOCK_CLASS = 0x72656275  # "rebu": held by the session rebuilding a projection

_ENSURE = """
insert into projection_checkpoints (name) select unnest($1::text[]) on conflict (name) do nothing
"""

_TRY_LOCK = "select pg_try_advisory_xact_lock($1, hashtext($2))"
_WAIT_FOR_LOCK = "select pg_advisory_xact_lock($1, hashtext($2))"

_LOAD = "select checkpoint::text from projection_checkpoints where name = $1"
_LOAD_MANY = "select name, checkpoint::text from projection_checkpoints where name = any($1::text[])"

_ADVANCE = """
update projection_checkpoints
set checkpoint = $3::jsonb, events_applied = events_applied + $4, last_event_at = $5, updated_at = clock_timestamp()
where name = $1 and checkpoint = $2::jsonb
"""

_REPLACE = """
update projection_checkpoints
set checkpoint = $2::jsonb, events_applied = $3, last_event_at = $4,
    updated_at = clock_timestamp(), rebuilt_at = clock_timestamp()
where name = $1
"""

_STATUS = """
select c.name, c.checkpoint::text, c.events_applied, c.last_event_at, c.updated_at, c.rebuilt_at,
       clock_timestamp() as now,
       exists (select 1 from pg_locks l where l.locktype = 'advisory' and l.granted and l.objsubid = 2
               and l.classid = $2::int4::oid and l.objid = hashtext(c.name)::oid) as rebuilding
from projection_checkpoints c
where $1::text[] is null or c.name = any($1::text[])
order by c.name
"""


class CheckpointMoved(Exception):
    """Another runner committed this projection's batch first; this batch is rolled back."""


class ProjectionStatus(msgspec.Struct, frozen=True):
    name: str
    checkpoint: Checkpoint
    events_applied: int
    last_event_at: datetime | None
    updated_at: datetime
    rebuilt_at: datetime | None
    lag_events: int  # committed events not applied yet
    lag_by_source: dict[int, int]  # the same, for each source (ledger.eventstore.commit_order)
    lag_s: float  # how long the oldest unapplied event has waited; 0 when caught up
    rebuilding: bool


async def ensure_checkpoints(connection: asyncpg.Connection, names: Sequence[str]) -> None:
    await connection.execute(_ENSURE, list(names))


async def try_lock(connection: asyncpg.Connection, name: str) -> bool:
    return await connection.fetchval(_TRY_LOCK, BATCH_LOCK_CLASS, name)


async def wait_for_lock(connection: asyncpg.Connection, name: str) -> None:
    await connection.execute(_WAIT_FOR_LOCK, BATCH_LOCK_CLASS, name)


async def load(connection: asyncpg.Connection, name: str) -> Checkpoint:
    row = await connection.fetchrow(_LOAD, name)
    if row is None:
        raise LookupError(f"projection {name!r} has no checkpoint; the runner creates it at start")
    return Checkpoint.from_json(row["checkpoint"])


async def load_many(connection: asyncpg.Connection, names: Sequence[str]) -> dict[str, Checkpoint]:
    """Where each projection stands, without its lock: a hint (the runner reads the events after it
    once for every projection standing there; each batch still checks its own under the lock)."""
    rows = await connection.fetch(_LOAD_MANY, list(names))
    return {row["name"]: Checkpoint.from_json(row["checkpoint"]) for row in rows}


async def advance(
    connection: asyncpg.Connection, name: str, after: Checkpoint, events: Sequence[RecordedEvent]
) -> None:
    moved = after.past(events)
    status = await connection.execute(
        _ADVANCE, name, after.to_json(), moved.to_json(), len(events), max(e.recorded_at for e in events)
    )
    if status != "UPDATE 1":
        raise CheckpointMoved(f"projection {name!r} moved past {after} while this batch was applied")


async def replace(
    connection: asyncpg.Connection,
    name: str,
    checkpoint: Checkpoint,
    events_applied: int,
    last_event_at: datetime | None,
) -> None:
    await connection.execute(_REPLACE, name, checkpoint.to_json(), events_applied, last_event_at)


async def statuses(
    connection: asyncpg.Connection | asyncpg.Pool, names: Sequence[str] | None = None
) -> list[ProjectionStatus]:
    """Each projection's place and lag: the events between it and the head of every source
    (see ``Checkpoint.behind``), and how long the oldest of them has waited."""
    store = EventStore(connection)
    rows = await connection.fetch(_STATUS, None if names is None else list(names), REBUILD_LOCK_CLASS)
    head = await store.head()
    found = []
    for row in rows:
        checkpoint = Checkpoint.from_json(row["checkpoint"])
        next_at = await store.next_recorded_at(checkpoint) if checkpoint.behind(head) else None
        found.append(_status(row, checkpoint, head, next_at))
    return found


def _status(
    row: asyncpg.Record, checkpoint: Checkpoint, head: Checkpoint, next_at: datetime | None
) -> ProjectionStatus:
    waited = row["now"] - next_at if next_at is not None else None
    return ProjectionStatus(
        name=row["name"],
        checkpoint=checkpoint,
        events_applied=row["events_applied"],
        last_event_at=row["last_event_at"],
        updated_at=row["updated_at"],
        rebuilt_at=row["rebuilt_at"],
        lag_events=checkpoint.behind(head),
        lag_by_source=checkpoint.behind_by_source(head),
        lag_s=max(0.0, waited.total_seconds()) if waited is not None else 0.0,
        rebuilding=row["rebuilding"],
    )
