"""Snapshots written behind the commands that make them due, many to a transaction.

A snapshot is a cache of a card's state at a version: the events stay the truth, and a card
with no snapshot, or an older one, loads all the same from its events. So no command waits for
one. A command that makes its card's snapshot due answers once its event is committed, and one
writer task stores what it was handed, a batch to a transaction, whatever stores the cards are
of. When every hundredth Debit of a card waited for a statement and a commit of its own, those
Debits were the slowest hundredth of a checkout's load: its p99 (docs/benchmarks.md, "Snapshots
off the Debit's path").

A batch that cannot be written is logged and dropped: its cards load from a few more events
until a later snapshot takes their place.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from ledger.eventstore.store import EventStore, Snapshot
from ledger.postgres.database import DATABASE_ERRORS
from ledger.postgres.tenancy import current_scope

log = logging.getLogger(__name__)

# Small batches: a burst of snapshots (a card's state grows with its transactions) then reaches
# the WAL between the group commits, not as one long write ahead of them.
BATCH_SNAPSHOTS_MAX = 32


class SnapshotWriter:
    def __init__(self, store: EventStore, *, batch_max: int = BATCH_SNAPSHOTS_MAX) -> None:
        self.store = store
        self.batch_max = batch_max
        self._due: dict[str, Snapshot] = {}  # by stream: the newest version handed over
        self._writing: asyncio.Task[None] | None = None

    def save_later(self, stream_id: str, version: int, hash_: bytes, state: bytes) -> None:
        """Hands a snapshot over, as the caller's store's; an older one of the same stream still
        waiting is replaced."""
        waiting = self._due.get(stream_id)
        if waiting is None or waiting.version < version:
            self._due[stream_id] = Snapshot(stream_id, version, hash_, state, current_scope())
        if self._writing is None:
            # A context of its own: the writer is no request's, whichever made the first one due.
            self._writing = asyncio.get_running_loop().create_task(
                self._write_while_due(), context=contextvars.Context()
            )

    async def saved(self) -> None:
        """Returns once every snapshot handed over so far is written, or given up."""
        while self._writing is not None:
            await asyncio.shield(self._writing)

    async def _write_while_due(self) -> None:
        try:
            while self._due:
                await self._write(self._next_batch())
        finally:
            self._writing = None

    def _next_batch(self) -> list[Snapshot]:
        """Up to ``batch_max`` of the oldest snapshots waiting, in stream order (two processes'
        writers then lock the rows they share in the same order)."""
        streams = list(self._due)[: self.batch_max]
        return [self._due.pop(stream_id) for stream_id in sorted(streams)]

    async def _write(self, snapshots: list[Snapshot]) -> None:
        try:
            await self.store.save_snapshots(snapshots)
        except DATABASE_ERRORS:
            log.warning("%d snapshots not saved; their cards load from their events", len(snapshots), exc_info=True)
