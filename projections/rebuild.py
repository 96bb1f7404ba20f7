"""Rebuilding one projection from zero while the service keeps running.

The replay goes into shadow copies of the projection's tables, in a schema of its own
(``rebuild_<name>``), batch by batch, each batch its own short transaction: the live tables
keep serving reads and the live runner keeps them current meanwhile, and no transaction stays
open for the whole replay. At the end one transaction takes the
projection's batch lock, replays the last few events into the shadow, copies it over the live
tables and sets the checkpoint to the shadow's. Readers see the old rows until that commit and
the new ones after it; a rebuild that dies leaves the live tables as they were.

The projection's SQL is the same for both: the shadow schema simply comes first in the
transaction's ``search_path``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import asyncpg
import msgspec

from ledger.eventstore.commit_order import START, Checkpoint
from ledger.eventstore.store import EventStore, RecordedEvent
from projections import checkpoints
from projections.projection import Projection
from projections.runner import BATCH_EVENTS_MAX

_TRY_REBUILD_LOCK = "select pg_try_advisory_lock($1, hashtext($2))"
_RELEASE_REBUILD_LOCK = "select pg_advisory_unlock($1, hashtext($2))"
_LIVE_SCHEMA = "select current_schema()"
_SHADOW_FIRST = "select set_config('search_path', $1, true)"
_COUNT_EVENTS = "select count(*) from events"
_SWAP_STATEMENT_TIMEOUT = "select set_config('statement_timeout', $1, true)"

# Copying a whole read model over the live one takes longer than a request's statement: allow it.
SWAP_STATEMENT_TIMEOUT_S = 600.0


class RebuildInProgress(Exception):
    """Another session is already rebuilding this projection."""


class RebuildResult(msgspec.Struct, frozen=True):
    name: str
    events_applied: int
    checkpoint: Checkpoint


class _Shadow:
    """The shadow tables of one rebuild and the replay position reached in them."""

    def __init__(self, projection: Projection, live_schema: str) -> None:
        self.projection = projection
        self.live = _ident(live_schema)
        self.schema = _ident(f"rebuild_{projection.name}")
        self.search_path = f"{self.schema}, {self.live}"
        self.checkpoint = START
        self.events_applied = 0
        self.last_event_at: datetime | None = None

    def create_sql(self) -> list[str]:
        # Unlogged: a shadow that does not survive a crash is simply rebuilt again.
        tables = [
            f"create unlogged table {self.schema}.{_ident(t)} (like {self.live}.{_ident(t)} including all)"
            for t in self.projection.tables
        ]
        return [f"drop schema if exists {self.schema} cascade", f"create schema {self.schema}", *tables]

    def swap_sql(self) -> list[str]:
        tables = [_ident(t) for t in self.projection.tables]
        emptied = [f"delete from {self.live}.{t}" for t in reversed(tables)]  # children before parents
        copied = [f"insert into {self.live}.{t} select * from {self.schema}.{t}" for t in tables]
        return emptied + copied

    def drop_sql(self) -> str:
        return f"drop schema if exists {self.schema} cascade"

    def record(self, events: list[RecordedEvent]) -> None:
        self.checkpoint = self.checkpoint.past(events)
        self.events_applied += len(events)
        self.last_event_at = max(event.recorded_at for event in events)


async def count_events(pool: asyncpg.Pool) -> int:
    """How many events a rebuild will read, about (for a progress bar; more may arrive meanwhile)."""
    return await pool.fetchval(_COUNT_EVENTS)


async def rebuild(
    pool: asyncpg.Pool,
    projection: Projection,
    *,
    batch_events_max: int = BATCH_EVENTS_MAX,
    on_progress: Callable[[int], None] | None = None,
) -> RebuildResult:
    """Replays ``projection`` from the first event into a shadow, then swaps it in atomically."""
    store = EventStore(pool)
    async with pool.acquire() as connection:
        if not await connection.fetchval(_TRY_REBUILD_LOCK, checkpoints.REBUILD_LOCK_CLASS, projection.name):
            raise RebuildInProgress(f"projection {projection.name!r} is already being rebuilt")
        shadow = _Shadow(projection, await connection.fetchval(_LIVE_SCHEMA))
        try:
            async with connection.transaction():
                await checkpoints.ensure_checkpoints(connection, [projection.name])
                for sql in shadow.create_sql():
                    await connection.execute(sql)
            while True:  # batch by batch, each committed on its own, while the live tables keep serving
                async with connection.transaction():
                    if not await _apply_to_shadow(connection, store, shadow, batch_events_max, on_progress):
                        break
            async with connection.transaction():
                await checkpoints.wait_for_lock(connection, projection.name)
                while await _apply_to_shadow(connection, store, shadow, batch_events_max, on_progress):
                    pass  # what committed meanwhile; with the batch lock held, the live tables stand still
                await connection.execute(_SWAP_STATEMENT_TIMEOUT, f"{round(SWAP_STATEMENT_TIMEOUT_S * 1000)}")
                for sql in shadow.swap_sql():
                    await connection.execute(sql, timeout=SWAP_STATEMENT_TIMEOUT_S)
                await checkpoints.replace(
                    connection, projection.name, shadow.checkpoint, shadow.events_applied, shadow.last_event_at
                )
        finally:
            await connection.execute(shadow.drop_sql())
            await connection.fetchval(_RELEASE_REBUILD_LOCK, checkpoints.REBUILD_LOCK_CLASS, projection.name)
    return RebuildResult(projection.name, shadow.events_applied, shadow.checkpoint)


async def _apply_to_shadow(
    connection: asyncpg.Connection,
    store: EventStore,
    shadow: _Shadow,
    batch_events_max: int,
    on_progress: Callable[[int], None] | None,
) -> int:
    """Must run inside a transaction: the shadow-first search_path lasts until it ends."""
    await connection.fetchval(_SHADOW_FIRST, shadow.search_path)
    events = await store.read_all(shadow.checkpoint, batch_events_max, connection=connection)
    if events:
        await shadow.projection.apply(connection, events)
        shadow.record(events)
        if on_progress is not None:
            on_progress(len(events))
    return len(events)


def _ident(name: str) -> str:
    """A quoted SQL identifier (names come from code, but quoting keeps them exactly as written)."""
    return '"' + name.replace('"', '""') + '"'
