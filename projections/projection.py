"""What a projection is: a name, the tables it owns, and a handler per event type it follows.

A projection's ``apply`` runs inside the runner's batch transaction, on the connection it is
given, and must not commit: its writes and the checkpoint move together or not at all. It
must not read other projections' tables either, since each one advances (and is rebuilt)
on its own.

A batch holds many stores' events and is applied in every store's scope (ALL_TENANTS): a
``BatchedProjection``'s runs write rows that name each its store, taken from its event; a
handler runs in its event's store's scope (``BatchScope``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from ledger.eventstore.store import RecordedEvent
from ledger.postgres.tenancy import ALL_TENANTS

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
        scope = BatchScope(connection)
        for event in events:
            handler = handlers.get(event.name)
            if handler is not None:
                await scope.enter(event.tenant)
                await handler(connection, event)
        await scope.enter(ALL_TENANTS)


class BatchScope:
    """The scope a batch's transaction holds, changed only when it must: a handler's statements
    run in its event's store's scope, whose rows they write without naming it (the column's
    default) and alone see; a run's, and whatever follows the batch, in every store's."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.held = ALL_TENANTS  # the runner's, and a rebuild's

    async def enter(self, scope: str) -> None:
        if scope != self.held:
            await self.connection.execute("select set_config('giftcard.tenant', $1, true)", scope)
            self.held = scope


class BatchedProjection(Projection):
    """A projection that applies runs of consecutive ``batched`` events set-based (``apply_run``: a
    few statements a run, whatever its length) and every other event by its handler, in order.

    ``apply_run`` is the one path of its events (a run may be a single event): there is no handler
    per event beside it to drift from it. It must leave the tables as applying its events one after
    the other would, and raise ProjectionBug when an event of the run does not find the state it
    needs (the runner then halves the batch down to that event).
    """

    batched: frozenset[str] = frozenset()

    async def apply_run(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        raise NotImplementedError

    async def apply(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        handlers = self.handlers()
        scope = BatchScope(connection)
        run: list[RecordedEvent] = []
        for event in events:
            if event.name in self.batched:
                run.append(event)
                continue
            handler = handlers.get(event.name)
            if handler is None:
                continue
            if run:
                await scope.enter(ALL_TENANTS)
                await self.apply_run(connection, run)
                run = []
            await scope.enter(event.tenant)
            await handler(connection, event)
        await scope.enter(ALL_TENANTS)
        if run:
            await self.apply_run(connection, run)


def expect_rows(status: str, expected: int, what: str, events: Sequence[RecordedEvent]) -> None:
    """A set-based statement of ``apply_run`` must touch ``expected`` rows (asyncpg status ``... N``)."""
    touched = int(status.rsplit(" ", 1)[-1])
    if touched != expected:
        first, last = events[0], events[-1]
        raise ProjectionBug(
            f"{what}: {touched} row(s) of {expected} found for events {first.position}..{last.position}"
        )
