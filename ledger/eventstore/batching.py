"""Opportunistic batching: what concurrent commands send to PostgreSQL goes in one statement.

The first item goes out at once; the items that arrive while a statement is in flight go
together in the next one. At low load nothing waits; at high load the round trip, the pool
checkout and (for writes) the commit are paid once per batch instead of once per item.

A command that stops waiting (its deadline passed) cancels its answer; an item whose answer is
cancelled before its statement goes out is never sent, and the others of its batch are answered
as usual.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class Batcher(Generic[Item, Answer]):
    def __init__(self, batch_max: int) -> None:
        self.batch_max = batch_max
        self._waiting: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._flushing = False

    async def submit(self, item: Item) -> Answer:
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, answer))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush_while_waiting())
        return await answer

    async def _flush_while_waiting(self) -> None:
        try:
            while self._waiting:
                batch = self.next_batch()
                if not batch:  # every item waiting was abandoned
                    continue
                try:
                    await self.flush(batch)
                except BaseException as e:  # the database is gone: every command of the batch learns it
                    for _, answer in batch:
                        settle(answer, error=e)
                    if isinstance(e, asyncio.CancelledError):
                        raise
        finally:
            self._flushing = False

    def next_batch(self) -> list[tuple[Item, asyncio.Future[Answer]]]:
        """Up to ``batch_max`` of the oldest waiting items, one per stream: a second item on a
        stream waits for the next statement, so that each statement sees each stream once.
        Abandoned items are dropped: their commands have answered already, without them."""
        batch, later, streams = [], [], set()
        for waiting in self._waiting:
            if waiting[1].done():
                continue
            stream_id = self.stream_of(waiting[0])
            if len(batch) < self.batch_max and stream_id not in streams:
                batch.append(waiting)
                streams.add(stream_id)
            else:
                later.append(waiting)
        self._waiting = later
        return batch

    def stream_of(self, item: Item) -> str:
        raise NotImplementedError

    async def flush(self, batch: list[tuple[Item, asyncio.Future[Answer]]]) -> None:
        """Sends one batch and settles each answer (``settle``); whatever it raises goes to every answer."""
        raise NotImplementedError


def settle(answer: asyncio.Future[Answer], *, result: Answer | None = None, error: BaseException | None = None) -> None:
    if answer.done():  # its command was cancelled meanwhile
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)  # type: ignore[arg-type]
