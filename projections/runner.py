"""The projection runner: follows the commit order and keeps every read model current.

Each batch is one transaction: lock the projection, read its checkpoint, take the next
events after it (the ledger's gap-safe ``read_all``, so a late commit is never skipped),
apply them, and move the checkpoint. A crash anywhere rolls the whole batch back; the next
runner starts again from the last checkpoint that committed. Exactly once, per projection.

A round runs one batch of every projection that is due, side by side, each in its own
transaction on its own connection, so that PostgreSQL works on one read model's statements
while Python prepares another's. The events are read (and decoded) once per round for every
projection that stood at the same checkpoint when the round began, usually all of them.
That read is made before the locks, so each batch checks under its lock that its checkpoint
is still the one the events follow; if another runner moved it meanwhile, the batch reads
its own events inside its transaction instead. Events ``read_all`` returns are, in every
source, a prefix of its commit order that never changes (ledger.eventstore.commit_order), so a shared
read applies exactly what a read inside the batch would have.

Runners may run side by side (the one ``giftcard serve`` starts beside its workers, and
``giftcard projections run``): a runner that finds a projection locked skips it and
moves on, so each batch is applied by exactly one of them. A projection whose batch fails
backs off on its own; the others go on.

Under steady load a round finds only what was written while the last one applied, a few dozen
events, and every round pays the same fixed price (a read, then per projection a lock, a
transaction and its commit). So a round that caught up waits out the rest of
``round_interval_s`` before the next one: a few larger batches a second instead of many small
ones, for at most that much more lag. A runner that is behind (its last read was a full batch)
goes on at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from ledger.eventstore.commit_order import Checkpoint
from ledger.eventstore.store import EventStore, RecordedEvent
from ledger.postgres.database import DATABASE_ERRORS
from projections import checkpoints
from projections.projection import Projection

log = logging.getLogger(__name__)

BATCH_EVENTS_MAX = 2_000  # a batch is a few set-based statements a table (see BatchedProjection)
POLL_INTERVAL_S = 0.25
ROUND_INTERVAL_S = 0.1  # at 800 events a second: 9 rounds a second instead of 27 (docs/benchmarks.md)
FAILURE_BACKOFF_S = 0.5
FAILURE_BACKOFF_MAX_S = 30.0

BUSY = -1  # run_batch: another runner holds this projection's lock

OnBatch = Callable[[str, int], None]
_ReadTask = asyncio.Task[list[RecordedEvent]]


@dataclass
class _Health:
    """How one projection is faring in this runner: a failing batch shrinks (down to the one event
    that fails, so the checkpoint stops right before it) and waits longer before each retry."""

    batch_events: int
    failures: int = 0
    retry_at: float = 0.0


@dataclass(frozen=True)
class SharedRead:
    """The events after ``after``, read once for every projection of a round standing there."""

    after: Checkpoint
    events: list[RecordedEvent]


class ProjectionRunner:
    def __init__(
        self,
        pool: asyncpg.Pool,
        projections: Sequence[Projection],
        *,
        batch_events_max: int = BATCH_EVENTS_MAX,
        poll_interval_s: float = POLL_INTERVAL_S,
        round_interval_s: float = ROUND_INTERVAL_S,
        failure_backoff_s: float = FAILURE_BACKOFF_S,
        on_batch: OnBatch | None = None,
    ) -> None:
        if batch_events_max < 1:
            raise ValueError("batch_events_max must be at least 1")
        self.pool = pool
        self.store = EventStore(pool)
        self.projections = list(projections)
        self.batch_events_max = batch_events_max
        self.poll_interval_s = poll_interval_s
        self.round_interval_s = round_interval_s
        self.failure_backoff_s = failure_backoff_s
        self.on_batch = on_batch
        self._health = {p.name: _Health(batch_events_max) for p in self.projections}
        self._read_ahead: tuple[Checkpoint, _ReadTask] | None = None  # where it reads from, and the read

    async def prepare(self) -> None:
        async with self.pool.acquire() as connection:
            await checkpoints.ensure_checkpoints(connection, [p.name for p in self.projections])

    async def run_batch(
        self, projection: Projection, batch_events_max: int | None = None, read: SharedRead | None = None
    ) -> int:
        """Applies the next batch; returns how many events it read (0: caught up, BUSY: locked elsewhere).

        ``read``: events already read for this round, used when the checkpoint is still their ``after``.
        """
        limit = batch_events_max or self.batch_events_max
        async with self.pool.acquire() as connection, connection.transaction():
            if not await checkpoints.try_lock(connection, projection.name):
                return BUSY
            after = await checkpoints.load(connection, projection.name)
            if read is not None and read.after == after:
                events = read.events[:limit]
            else:
                events = await self.store.read_all(after, limit, connection=connection)
            if not events:
                return 0
            await projection.apply(connection, events)  # every store's, in every store's scope
            await checkpoints.advance(connection, projection.name, after, events)
        if self.on_batch is not None:
            self.on_batch(projection.name, len(events))
        return len(events)

    async def catch_up(self) -> int:
        """Runs batches until every projection is caught up (or held by another runner); for the CLI's --once."""
        await self.prepare()
        total = 0
        try:
            while (applied := await self.run_round()) > 0:
                total += applied
        finally:
            self._drop_read_ahead()
        return total

    async def run_forever(self) -> None:
        """Until cancelled. Never raises: a failing projection is retried with backoff, the others go on."""
        while True:
            try:
                await self.prepare()
                break
            except DATABASE_ERRORS as e:
                log.warning("projection runner cannot reach the database yet (%r); retrying", e)
                await asyncio.sleep(self.failure_backoff_s or POLL_INTERVAL_S)
        try:
            while True:
                began = time.monotonic()
                if await self.run_round() <= 0:
                    await asyncio.sleep(self.poll_interval_s)
                elif not self._behind():
                    await asyncio.sleep(max(0.0, self.round_interval_s - (time.monotonic() - began)))
        finally:
            self._drop_read_ahead()

    async def run_round(self) -> int:
        """One batch of every projection that is due, side by side; returns the events applied in all.

        Projections that stand at the same checkpoint share one read; the largest such group also
        reads ahead the events after its batch, for the next round, while this one applies.
        """
        now = time.monotonic()
        due = [p for p in self.projections if now >= self._health[p.name].retry_at]
        if not due:
            return 0
        try:
            async with self.pool.acquire() as connection:
                standing = await checkpoints.load_many(connection, [p.name for p in due])
        except Exception:
            standing = {}  # each batch then reads for itself, and fails (and backs off) on its own
        at: dict[Checkpoint | None, list[Projection]] = {}
        for projection in due:
            at.setdefault(standing.get(projection.name), []).append(projection)
        (lead, led), *others = sorted(at.items(), key=lambda group: len(group[1]), reverse=True)
        runs = [
            self._run_from(lead, led, self._take_read_ahead(lead), read_ahead=True),
            *(self._run_from(after, group) for after, group in others),
        ]
        return sum(await asyncio.gather(*runs))

    async def _run_from(
        self,
        after: Checkpoint | None,
        projections: list[Projection],
        ahead: _ReadTask | None = None,
        *,
        read_ahead: bool = False,
    ) -> int:
        """A batch of each of ``projections``, which stood at ``after``, from one read of the events
        (``ahead``, when it was read ahead; none when ``after`` is unknown: each batch reads its own)."""
        limit = max(self._health[p.name].batch_events for p in projections)
        read = None
        if after is not None:
            with contextlib.suppress(Exception):  # as when the checkpoints could not be loaded
                events = await ahead if ahead is not None else []
                if not events:  # none had followed when it was read ahead: look now
                    events = await self.store.read_all(after, limit)
                read = SharedRead(after, events)
        if read is not None and not read.events:
            return 0  # caught up; nothing to lock
        if read_ahead and read is not None and len(read.events) >= limit:  # a full batch: more likely follow
            self._start_read_ahead(read.after.past(read.events), limit)
        applied = await asyncio.gather(*(self._run_due(p, read) for p in projections))
        return sum(applied)

    def _behind(self) -> bool:
        """Whether the last round read a full batch: a read ahead is started for exactly that."""
        return self._read_ahead is not None

    def _start_read_ahead(self, after: Checkpoint, limit: int) -> None:
        self._drop_read_ahead()
        task = asyncio.create_task(self.store.read_all(after, limit))
        task.add_done_callback(_retrieve)
        self._read_ahead = (after, task)

    def _take_read_ahead(self, after: Checkpoint | None) -> _ReadTask | None:
        """The events read ahead, if they follow ``after``; any other read ahead is dropped."""
        if self._read_ahead is None or self._read_ahead[0] != after:
            self._drop_read_ahead()
            return None
        task = self._read_ahead[1]
        self._read_ahead = None
        return task

    def _drop_read_ahead(self) -> None:
        if self._read_ahead is not None:
            self._read_ahead[1].cancel()
            self._read_ahead = None

    async def _run_due(self, projection: Projection, read: SharedRead | None) -> int:
        health = self._health[projection.name]
        try:
            applied = await self.run_batch(projection, health.batch_events, read)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._failed(projection.name, health)
            return 0
        health.failures = 0
        health.batch_events = min(self.batch_events_max, health.batch_events * 2)
        return max(0, applied)

    def _failed(self, name: str, health: _Health) -> None:
        health.failures += 1
        health.batch_events = max(1, health.batch_events // 2)
        delay_s = min(FAILURE_BACKOFF_MAX_S, self.failure_backoff_s * 2 ** (health.failures - 1))
        health.retry_at = time.monotonic() + delay_s
        log.exception(
            "projection %s failed (%d in a row); retrying %d event(s) in %.1f s",
            name,
            health.failures,
            health.batch_events,
            delay_s,
        )


def _retrieve(task: _ReadTask) -> None:
    """Marks a read ahead's error seen: the batches that would have used it read for themselves
    instead, and report the error if it is still there."""
    if not task.cancelled():
        task.exception()
