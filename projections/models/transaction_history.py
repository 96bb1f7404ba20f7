"""Read model: every transaction with its settlements and cancellations, native and forwarded.

Native transactions come from the card events, with their currency, direction, order id and
every settlement and cancellation. Calls the hub forwarded to an external provider appear
when the provider answered "ok" to a create-transaction, settlement or cancellation, marked
with that provider; what the hub does not record about them (the direction of a transaction,
the card's currency, the id the provider gave a new transaction) stays null rather than guessed.
A create-transaction replayed with the same requestId (the provider answered with the original)
is one transaction, not two.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ledger.eventstore.store import RecordedEvent
from projections import events as ev
from projections.projection import BatchedProjection, Handler, ProjectionBug, expect_rows

log = logging.getLogger(__name__)

NAME = "transaction_history"
SETTLEMENT = "settlement"
CANCELLATION = "cancellation"


# A replay of a forwarded create-transaction (same provider, card and requestId) is skipped.
_INSERT_FORWARDED = """
insert into read_transactions (provider, card_id, transaction_id, source, value, request_id, date, position, operation)
values ($1, $2, $3, 'forwarded', $4, $5, $6, $7, $8)
on conflict do nothing
"""

_INSERT_OPERATION = """
insert into read_transaction_operations
    (provider, card_id, transaction_id, oid, kind, value, released, refunded, request_id, date, position)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
"""


# The creation of a transaction whose settlement or cancellation was applied first: each forwarded
# call is a stream of its own, so on another source (ledger.eventstore.commit_order), and the sources are
# followed side by side. The row the settlement created learns what the creation knows.
_FILL_FORWARDED = """
update read_transactions set value = $4, request_id = $5, date = $6, position = $7, operation = $8
where provider = $1 and card_id = $2 and transaction_id = $3 and source = 'forwarded' and value is null
"""

# A forwarded settlement or cancellation names the provider's transaction id, which the hub
# did not record at creation: the first one seen creates the row, with its value unknown.
_ADD_TO_FORWARDED = """
insert into read_transactions as t (provider, card_id, transaction_id, source, settled, cancelled, date, position)
values ($1, $2, $3, 'forwarded', $4, $5, $6, $7)
on conflict (provider, card_id, transaction_id) do update
set settled = t.settled + excluded.settled, cancelled = t.cancelled + excluded.cancelled
"""

# ---- a run of native events, set-based (apply_run) ----------------------------------------------

# Rows of a batch that spans many stores name each their store (the runner applies it in every store's
# scope): a card's by its event, a transaction's by its card's row.
_REMEMBER_CARDS = """
insert into read_history_cards (card_id, currency, tenant_id) select * from unnest($1::text[], $2::text[], $3::text[])
"""

_INSERT_NATIVES = """
insert into read_transactions
    (provider, card_id, transaction_id, source, operation, currency, value, settled, cancelled, released, refunded,
     description, request_id, order_id, date, position, tenant_id)
select $1, n.card_id, n.transaction_id, 'ledger', n.operation, c.currency, n.value, n.settled, n.cancelled, n.released,
       n.refunded, n.description, n.request_id, n.order_id, n.date, n.position, c.tenant_id
from unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[],
            $10::text[], $11::text[], $12::text[], $13::timestamptz[], $14::bigint[])
    as n(card_id, transaction_id, operation, value, settled, cancelled, released, refunded, description, request_id,
         order_id, date, position)
join read_history_cards c on c.card_id = n.card_id
"""

_ADD_TO_NATIVES = """
update read_transactions t
set settled = t.settled + d.settled, cancelled = t.cancelled + d.cancelled,
    released = t.released + d.released, refunded = t.refunded + d.refunded
from unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])
    as d(card_id, transaction_id, settled, cancelled, released, refunded)
where t.provider = $1 and t.card_id = d.card_id and t.transaction_id = d.transaction_id
"""

_INSERT_OPERATIONS = """
insert into read_transaction_operations
    (provider, card_id, transaction_id, oid, kind, value, released, refunded, request_id, date, position, tenant_id)
select $1, o.* from unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::bigint[],
                           $9::text[], $10::timestamptz[], $11::bigint[], $12::text[])
    as o(card_id, transaction_id, oid, kind, value, released, refunded, request_id, date, position, tenant_id)
"""

_SETTLED_AT = 4  # where settled, cancelled, released, refunded start in a row of _INSERT_NATIVES

# ---- reads ---------------------------------------------------------------------------------

_FILTER = """
from read_transactions t
where ($1::text is null or t.card_id = $1)
  and ($2::text is null or t.provider = $2)
  and ($3::text is null or t.operation = $3)
  and ($4::text is null or t.order_id = $4)
  and ($5::timestamptz is null or t.date >= $5)
  and ($6::timestamptz is null or t.date < $6)
"""

_COUNT = f"select count(*) {_FILTER}"
_PAGE = f"select t.* {_FILTER} order by t.date, t.position offset $7 limit $8"

_OPERATIONS_OF = """
select o.* from read_transaction_operations o
join unnest($1::text[], $2::text[], $3::text[]) as k(provider, card_id, transaction_id)
  on o.provider = k.provider and o.card_id = k.card_id and o.transaction_id = k.transaction_id
order by o.position
"""


@dataclass(frozen=True)
class TransactionFilter:
    card_id: str | None = None
    provider: str | None = None
    operation: str | None = None
    order_id: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


class TransactionHistory(BatchedProjection):
    name = NAME
    tables = ("read_transactions", "read_transaction_operations", "read_history_cards")
    batched = frozenset((ev.ISSUED, ev.CREDITED, ev.DEBITED, ev.SETTLED, ev.CANCELLED, ev.VOIDED))

    def __init__(self, native_provider_id: str) -> None:
        self.native = native_provider_id

    def handlers(self) -> dict[str, Handler]:
        return {ev.FORWARDED: self.forwarded}  # card events: apply_run, always

    async def apply_run(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        """The card events' effect in four statements: cards; the transactions created here, with the sums
        of their settlements and cancellations here already in; the settled, cancelled, released and
        refunded sums of every earlier transaction moved here; and the operations themselves."""
        cards: list[tuple[str, str, str]] = []
        created: dict[tuple[str, str], list[Any]] = {}  # row, with settled, cancelled, released, refunded
        sums: dict[tuple[str, str], list[int]] = {}  # of transactions created before this run
        operations: list[tuple[object, ...]] = []
        for event in events:
            if event.name == ev.ISSUED:
                cards.append((event.stream_id, ev.decode(event, ev.Issued).currency, event.tenant))
                continue
            if event.name in (ev.CREDITED, ev.DEBITED):
                c = ev.decode(event, ev.TransactionCreated)
                key = (event.stream_id, c.transaction_id)
                if key in created:
                    raise ProjectionBug(f"event {event.position}: transaction {key} created twice")
                created[key] = [
                    event.stream_id, c.transaction_id, ev.OPERATION_OF[event.name], c.value, 0, 0, 0, 0,
                    c.description, c.request_id, c.order_id, ev.instant(c.date), event.position,
                ]  # fmt: skip
                continue
            if event.name == ev.SETTLED:
                m = ev.decode(event, ev.Settled)
                moved = (m.value, 0, 0, 0)
                operations.append((
                    event.stream_id, m.transaction_id, m.oid, SETTLEMENT, m.value, None, None, m.request_id,
                    ev.instant(m.date), event.position, event.tenant,
                ))  # fmt: skip
            else:
                m = ev.decode(event, ev.Cancelled)
                moved = (0, m.value, m.released, m.refunded)
                operations.append((
                    event.stream_id, m.transaction_id, m.oid, CANCELLATION, m.value, m.released, m.refunded,
                    m.request_id, ev.instant(m.date), event.position, event.tenant,
                ))  # fmt: skip
            key = (event.stream_id, m.transaction_id)
            row = created.get(key)
            if row is not None:
                for i, amount in enumerate(moved):
                    row[_SETTLED_AT + i] += amount
            else:
                earlier = sums.setdefault(key, [0, 0, 0, 0])
                for i, amount in enumerate(moved):
                    earlier[i] += amount
        if cards:
            await connection.execute(_REMEMBER_CARDS, *map(list, zip(*cards, strict=True)))
        if created:
            columns = map(list, zip(*created.values(), strict=True))
            status = await connection.execute(_INSERT_NATIVES, self.native, *columns)
            expect_rows(status, len(created), "cards of transaction_history", events)
        if sums:
            keys = list(sums)
            columns = [[k[0] for k in keys], [k[1] for k in keys]] + [[s[i] for s in sums.values()] for i in range(4)]
            status = await connection.execute(_ADD_TO_NATIVES, self.native, *columns)
            expect_rows(status, len(sums), "transactions of transaction_history", events)
        if operations:
            await connection.execute(_INSERT_OPERATIONS, self.native, *map(list, zip(*operations, strict=True)))

    async def forwarded(self, connection: asyncpg.Connection, event: RecordedEvent) -> None:
        call = ev.decode(event, ev.Forwarded)
        if not ev.forwarded_money(call) or call.operation == ev.FORWARDED_CREATE_CARD:
            return
        amount = ev.forwarded_amount(call.value)
        if amount is None or call.card_id is None:
            log.warning("forwarded call at position %d has no exact amount or card; not in history", event.position)
            return
        if call.operation == ev.FORWARDED_CREATE_TRANSACTION:
            await self._forwarded_transaction(connection, event, call, amount)
        elif call.transaction_id is not None:
            await self._forwarded_operation(connection, event, call, amount)

    async def _forwarded_transaction(
        self, connection: asyncpg.Connection, event: RecordedEvent, call: ev.Forwarded, amount: int
    ) -> None:
        row = (
            call.provider_id,
            call.card_id,
            call.transaction_id or event.stream_id,  # the provider's id when the hub recorded it
            amount,
            (call.request_id or "").strip() or None,  # a blank requestId identifies nothing
            event.recorded_at,
            event.position,
            call.transaction_operation,
        )
        if await connection.execute(_FILL_FORWARDED, *row) == "UPDATE 0":
            await connection.execute(_INSERT_FORWARDED, *row)

    async def _forwarded_operation(
        self, connection: asyncpg.Connection, event: RecordedEvent, call: ev.Forwarded, amount: int
    ) -> None:
        kind = SETTLEMENT if call.operation == ev.FORWARDED_SETTLE else CANCELLATION
        key = (call.provider_id, call.card_id, call.transaction_id)
        settled, cancelled = (amount, 0) if kind == SETTLEMENT else (0, amount)
        await connection.execute(_ADD_TO_FORWARDED, *key, settled, cancelled, event.recorded_at, event.position)
        await connection.execute(
            _INSERT_OPERATION,
            *key,
            event.stream_id,  # the provider's oid is not recorded; the call's own stream names it
            kind,
            amount,
            None,
            None,
            call.request_id,
            event.recorded_at,
            event.position,
        )


# ---- queries for the read API ----------------------------------------------------------------


async def list_transactions(
    connection: asyncpg.Connection, where: TransactionFilter, offset: int, limit: int
) -> tuple[list[asyncpg.Record], dict[tuple[str, str, str], list[asyncpg.Record]], int]:
    """A page of transactions in date order, their settlements and cancellations, and the total."""
    filters = (where.card_id, where.provider, where.operation, where.order_id, where.since, where.until)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        total = await connection.fetchval(_COUNT, *filters)
        rows = await connection.fetch(_PAGE, *filters, offset, limit)
        keys = [(r["provider"], r["card_id"], r["transaction_id"]) for r in rows]
        operations = await connection.fetch(
            _OPERATIONS_OF, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
        )
    by_transaction: dict[tuple[str, str, str], list[asyncpg.Record]] = {k: [] for k in keys}
    for operation in operations:
        by_transaction[(operation["provider"], operation["card_id"], operation["transaction_id"])].append(operation)
    return rows, by_transaction, total
