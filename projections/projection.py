"""What a projection is: a name, the tables it owns, and a handler per event type it follows.

A projection's ``apply`` runs inside the runner's batch transaction, on the connection it is
given, and must not commit: its writes and the checkpoint move together or not at all. It
must not read other projections' tables either, since each one advances (and is rebuilt)
on its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from ledger.store import RecordedEvent

Handler = Callable[[asyncpg.Connection, RecordedEvent], Awaitable[None]]


class ProjectionBug(Exception):
    """An event did not find the state it needs (a card, a transaction): the read model is wrong.

    Raising rolls the whole batch back, so the runner stops at that event, loudly, instead of
    publishing a wrong figure; ``giftcard projections rebuild`` repairs it once the bug is fixed.
    """


class Projection:
    name: str = ""
    tables: tuple[str, ...] = ()  # the tables it owns, parents before children

    def handlers(self) -> dict[str, Handler]:
        raise NotImplementedError

    async def apply(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        handlers = self.handlers()
        for event in events:
            handler = handlers.get(event.type)
            if handler is not None:
                await handler(connection, event)


async def execute_one(connection: asyncpg.Connection, sql: str, *args: object, event: RecordedEvent) -> None:
    """Runs a statement that must touch exactly one row (asyncpg status like ``UPDATE 1``)."""
    status = await connection.execute(sql, *args)
    if not status.endswith(" 1"):
        raise ProjectionBug(f"event {event.position} ({event.type} on {event.stream_id}) touched {status!r}")
