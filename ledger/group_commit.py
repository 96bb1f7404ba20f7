"""Group commit: concurrent commands on different cards share one INSERT and one commit.

Each command still appends exactly what it would alone, guarded by its card's version and
previous hash; ``EventStore.append_each`` judges every row on its own, so one command's lost
race never fails another's. Batching is opportunistic: the first command goes out at once,
and the commands that arrive while a statement is in flight go together in the next one. At
low load nothing waits; at high load the commit, the round trip and the pool checkout are paid
once per batch instead of once per command.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from ledger.domain.errors import ConcurrentUpdate, InvalidRequest
from ledger.store import EventStore, NewEvent, OneEvent, chain_hash

BATCH_APPENDS_MAX = 256


class GroupCommitter:
    def __init__(self, store: EventStore, *, batch_appends_max: int = BATCH_APPENDS_MAX) -> None:
        self.store = store
        self.batch_appends_max = batch_appends_max
        self._waiting: list[tuple[OneEvent, asyncio.Future[bytes]]] = []
        self._flushing = False

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
        one = OneEvent(stream_id, expected_version, event, previous_hash, hash_, idempotency_key, metadata)
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.append((one, answer))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush_while_waiting())
        return await answer

    async def _flush_while_waiting(self) -> None:
        try:
            while self._waiting:
                batch = self._next_batch()
                await self._flush(batch)
        finally:
            self._flushing = False

    def _next_batch(self) -> list[tuple[OneEvent, asyncio.Future[bytes]]]:
        """Up to the limit, one command per stream: a second command on a card waits for the next batch."""
        batch, later, streams = [], [], set()
        for item in self._waiting:
            if len(batch) < self.batch_appends_max and item[0].stream_id not in streams:
                batch.append(item)
                streams.add(item[0].stream_id)
            else:
                later.append(item)
        self._waiting = later
        return batch

    async def _flush(self, batch: list[tuple[OneEvent, asyncio.Future[bytes]]]) -> None:
        try:
            appended = await self.store.append_each([one for one, _ in batch])
        except InvalidRequest:
            await self._flush_one_by_one(batch)  # one request's bad text must not fail the others
            return
        except asyncpg.TransactionRollbackError:
            # Deadlock or serialization failure against another process: nothing of the batch was
            # written, and each command retries on fresh state like any lost race.
            for one, answer in batch:
                _settle(answer, error=ConcurrentUpdate(f"stream {one.stream_id} was contended; retrying"))
            return
        except BaseException as e:  # the database is gone: every command of the batch learns it
            for _, answer in batch:
                _settle(answer, error=e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for one, answer in batch:
            if one.stream_id in appended:
                _settle(answer, result=one.hash)
            else:
                _settle(
                    answer,
                    error=ConcurrentUpdate(f"stream {one.stream_id} changed since version {one.expected_version}"),
                )

    async def _flush_one_by_one(self, batch: list[tuple[OneEvent, asyncio.Future[bytes]]]) -> None:
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
                _settle(answer, error=e)
            else:
                _settle(answer, result=result)


def _settle(answer: asyncio.Future[bytes], *, result: bytes | None = None, error: BaseException | None = None) -> None:
    if answer.done():  # its command was cancelled meanwhile; the ledger forgets that card
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)
