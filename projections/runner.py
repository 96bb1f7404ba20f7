"""The projection runner: follows the global event order and keeps every read model current.

Each batch is one transaction: lock the projection, read its checkpoint, read the next
events after it (the ledger's gap-safe ``read_all``, so a late commit is never skipped),
apply them, and move the checkpoint. A crash anywhere rolls the whole batch back; the next
runner starts again from the last checkpoint that committed. Exactly once, per projection.

Runners may run side by side (inside every ``giftcard serve`` process and as
``giftcard projections run``): a runner that finds a projection locked skips it and
moves on, so each batch is applied by exactly one of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from ledger.store import EventStore
from projections import checkpoints
from projections.projection import Projection

log = logging.getLogger(__name__)

BATCH_EVENTS_MAX = 2_000  # a batch is a few set-based statements a table (see BatchedProjection)
POLL_INTERVAL_S = 0.25
FAILURE_BACKOFF_S = 0.5
FAILURE_BACKOFF_MAX_S = 30.0

BUSY = -1  # run_batch: another runner holds this projection's lock

OnBatch = Callable[[str, int], None]


@dataclass
class _Health:
    """How one projection is faring in this runner: a failing batch shrinks (down to the one event
    that fails, so the checkpoint stops right before it) and waits longer before each retry."""

    batch_events: int
    failures: int = 0
    retry_at: float = 0.0


class ProjectionRunner:
    def __init__(
        self,
        pool: asyncpg.Pool,
        projections: Sequence[Projection],
        *,
        batch_events_max: int = BATCH_EVENTS_MAX,
        poll_interval_s: float = POLL_INTERVAL_S,
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
        self.failure_backoff_s = failure_backoff_s
        self.on_batch = on_batch
        self._health = {p.name: _Health(batch_events_max) for p in self.projections}

    async def prepare(self) -> None:
        async with self.pool.acquire() as connection:
            await checkpoints.ensure_checkpoints(connection, [p.name for p in self.projections])

    async def run_batch(self, projection: Projection, batch_events_max: int | None = None) -> int:
        """Applies the next batch; returns how many events it read (0: caught up, BUSY: locked elsewhere)."""
        limit = batch_events_max or self.batch_events_max
        async with self.pool.acquire() as connection, connection.transaction():
            if not await checkpoints.try_lock(connection, projection.name):
                return BUSY
            after = await checkpoints.load(connection, projection.name)
            events = await self.store.read_all(after, limit, connection=connection)
            if not events:
                return 0
            await projection.apply(connection, events)
            await checkpoints.advance(connection, projection.name, after, events)
        if self.on_batch is not None:
            self.on_batch(projection.name, len(events))
        return len(events)

    async def catch_up(self) -> int:
        """Runs batches until every projection is caught up (or held by another runner); for the CLI's --once."""
        await self.prepare()
        total = 0
        while (applied := await self.run_round()) > 0:
            total += applied
        return total

    async def run_forever(self) -> None:
        """Until cancelled. Never raises: a failing projection is retried with backoff, the others go on."""
        while True:
            try:
                await self.prepare()
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("projection runner cannot reach the database yet (%r); retrying", e)
                await asyncio.sleep(self.failure_backoff_s or POLL_INTERVAL_S)
        while True:
            if await self.run_round() <= 0:
                await asyncio.sleep(self.poll_interval_s)

    async def run_round(self) -> int:
        """One batch of every projection that is due; returns the events applied in all."""
        applied = 0
        for projection in self.projections:
            health = self._health[projection.name]
            if time.monotonic() < health.retry_at:
                continue
            try:
                applied += max(0, await self.run_batch(projection, health.batch_events))
            except asyncio.CancelledError:
                raise
            except Exception:
                self._failed(projection.name, health)
            else:
                health.failures = 0
                health.batch_events = min(self.batch_events_max, health.batch_events * 2)
        return applied

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
