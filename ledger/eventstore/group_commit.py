"""Group commit: concurrent commands on different cards share one INSERT and one commit.

Each command still appends exactly what it would alone, guarded by its card's version and
previous hash; ``EventStore.append_each`` judges every row on its own, so one command's lost
race never fails another's. Batching is opportunistic (see ``ledger.eventstore.batching``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from ledger.domain.errors import ConcurrentUpdate, InvalidRequest
from ledger.eventstore.batching import Batcher, settle
from ledger.eventstore.store import EventStore, NewEvent, OneEvent, chain_hash
from ledger.postgres.tenancy import current_scope

BATCH_APPENDS_MAX = 256

Waiting = tuple[OneEvent, "asyncio.Future[bytes]"]


class GroupCommitter(Batcher[OneEvent, bytes]):
    def __init__(self, store: EventStore, *, batch_appends_max: int = BATCH_APPENDS_MAX) -> None:
        super().__init__(batch_appends_max)
        self.store = store

    async def append(
        self,
        stream_id: str,
        expected_version: int,
        event: NewEvent,
        *,
        previous_hash: bytes,
        idempotency_key: str | None,
        metadata: dict[str, Any] | None,
    ) -> bytes:
        """Appends one event after ``expected_version`` and returns its hash, or raises ConcurrentUpdate."""
        hash_ = chain_hash(previous_hash, stream_id, expected_version + 1, event.type, event.data)
        return await self.submit(
            OneEvent(
                stream_id, expected_version, event, previous_hash, hash_, idempotency_key, metadata, current_scope()
            )
        )

    def stream_of(self, item: OneEvent) -> str:
        return item.stream_id

    async def flush(self, batch: list[Waiting]) -> None:
        # On Citus each shard's share of the batch is its own call and commit on its worker, so it
        # succeeds or fails on its own, and so do its commands: a worker down fails only the cards
        # it holds. On one server the batch is one share.
        shard_of = await self.store.shards_of([one.stream_id for one, _ in batch])
        shares: dict[int, list[Waiting]] = {}
        for waiting in batch:
            shares.setdefault(shard_of[waiting[0].stream_id], []).append(waiting)
        if len(shares) == 1:
            await self._flush_share(batch)
        else:
            await asyncio.gather(*map(self._flush_share_alone, shares.values()))

    async def _flush_share_alone(self, share: list[Waiting]) -> None:
        """A share's failure goes to its own commands only (the Batcher would give it to the whole
        batch, whose other shares may have committed)."""
        try:
            await self._flush_share(share)
        except Exception as e:
            for _, answer in share:
                settle(answer, error=e)

    async def _flush_share(self, batch: list[Waiting]) -> None:
        try:
            appended = await self.store.append_each([one for one, _ in batch])
        except InvalidRequest:
            await self._flush_one_by_one(batch)  # one request's bad text must not fail the others
            return
        except asyncpg.TransactionRollbackError:
            # Deadlock or serialization failure against another process: nothing of the batch was
            # written, and each command retries on fresh state like any lost race.
            for one, answer in batch:
                settle(answer, error=ConcurrentUpdate(f"stream {one.stream_id} was contended; retrying"))
            return
        for one, answer in batch:
            if one.stream_id in appended:
                settle(answer, result=one.hash)
            else:
                settle(
                    answer,
                    error=ConcurrentUpdate(f"stream {one.stream_id} changed since version {one.expected_version}"),
                )

    async def _flush_one_by_one(self, batch: list[Waiting]) -> None:
        for one, answer in batch:
            try:
                result = await self.store.append(
                    one.stream_id,
                    one.expected_version,
                    [one.event],
                    previous_hash=one.previous_hash,
                    idempotency_key=one.idempotency_key,
                    metadata=one.metadata,
                )
            except Exception as e:
                settle(answer, error=e)
            else:
                settle(answer, result=result)
