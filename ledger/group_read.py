"""Group read: before deciding, concurrent commands learn in one query what other processes
appended to their cards since this process cached them.

Where several processes write the same cards (``giftcard serve --workers N``), a cached card
is stale as often as not, and deciding on stale state loses the append's race: the card is
then reloaded from its snapshot and decided again. Reading each card's tail first, a batch
at a time (see ``ledger.batching``), turns that reload into a catch-up of an event or two,
for one round trip per batch.
"""

from __future__ import annotations

import asyncio

from ledger.batching import Batcher, settle
from ledger.store import EventStore, RecordedEvent

BATCH_READS_MAX = 256

Waiting = tuple[tuple[str, int], "asyncio.Future[list[RecordedEvent]]"]


class GroupReader(Batcher[tuple[str, int], list[RecordedEvent]]):
    def __init__(self, store: EventStore, *, batch_reads_max: int = BATCH_READS_MAX) -> None:
        super().__init__(batch_reads_max)
        self.store = store

    async def events_after(self, stream_id: str, version: int) -> list[RecordedEvent]:
        """The stream's events after ``version`` (usually none, or the few another process appended)."""
        return await self.submit((stream_id, version))

    def stream_of(self, item: tuple[str, int]) -> str:
        return item[0]

    async def flush(self, batch: list[Waiting]) -> None:
        tails = await self.store.read_streams_after([known for known, _ in batch])
        for (stream_id, _), answer in batch:
            settle(answer, result=tails.get(stream_id, []))
