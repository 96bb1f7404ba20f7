"""Group read: before deciding, concurrent commands learn in one query what other processes
appended to their cards since this process cached them.

Where several processes write the same cards (``giftcard serve --workers N``), a cached card
is stale as often as not, and deciding on stale state loses the append's race: the card is
then reloaded from its snapshot and decided again. Reading each card's tail first, a batch
at a time (see ``ledger.eventstore.batching``), turns that reload into a catch-up of an event or two,
for one round trip per batch.
"""

from __future__ import annotations

import asyncio

from ledger.eventstore.batching import Batcher, settle
from ledger.eventstore.store import EventStore, KnownTail, RecordedEvent

BATCH_READS_MAX = 256

Waiting = tuple[KnownTail, "asyncio.Future[list[RecordedEvent] | None]"]


class GroupReader(Batcher[KnownTail, "list[RecordedEvent] | None"]):
    def __init__(self, store: EventStore, *, batch_reads_max: int = BATCH_READS_MAX) -> None:
        super().__init__(batch_reads_max)
        self.store = store

    async def events_after(self, known: KnownTail) -> list[RecordedEvent] | None:
        """The stream's events after the one known (usually none, or the few another process
        appended); None when the stream no longer holds the event known (see ``read_streams_after``)."""
        return await self.submit(known)

    def stream_of(self, item: KnownTail) -> str:
        return item.stream_id

    async def flush(self, batch: list[Waiting]) -> None:
        tails = await self.store.read_streams_after([known for known, _ in batch])
        for known, answer in batch:
            settle(answer, result=tails[known.stream_id])
