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
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ledger.store import RecordedEvent
from projections import events as ev
from projections.projection import Handler, Projection, execute_one

log = logging.getLogger(__name__)

NAME = "transaction_history"
SETTLEMENT = "settlement"
CANCELLATION = "cancellation"

_REMEMBER_CARD = "insert into read_history_cards (card_id, currency) values ($1, $2)"

_INSERT_NATIVE = """
insert into read_transactions
    (provider, card_id, transaction_id, source, operation, currency, value, released, refunded,
     description, request_id, order_id, date, position)
select $1, $2, $3, 'ledger', $4, c.currency, $5, 0, 0, $6, $7, $8, $9, $10
from read_history_cards c where c.card_id = $2
"""

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

_ADD_TO_NATIVE = """
update read_transactions
set settled = settled + $4::bigint, cancelled = cancelled + $5::bigint,
    released = released + $6::bigint, refunded = refunded + $7::bigint
where provider = $1 and card_id = $2 and transaction_id = $3
"""

# A forwarded settlement or cancellation names the provider's transaction id, which the hub
# did not record at creation: the first one seen creates the row, with its value unknown.
_ADD_TO_FORWARDED = """
insert into read_transactions as t (provider, card_id, transaction_id, source, settled, cancelled, date, position)
values ($1, $2, $3, 'forwarded', $4, $5, $6, $7)
on conflict (provider, card_id, transaction_id) do update
set settled = t.settled + excluded.settled, cancelled = t.cancelled + excluded.cancelled
"""

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


class TransactionHistory(Projection):
    name = NAME
    tables = ("read_transactions", "read_transaction_operations", "read_history_cards")

    def __init__(self, native_provider_id: str) -> None:
        self.native = native_provider_id

    def handlers(self) -> dict[str, Handler]:
        return {
            ev.ISSUED: self.issued,
            ev.CREDITED: self.transaction_created,
            ev.DEBITED: self.transaction_created,
            ev.SETTLED: self.settled,
            ev.CANCELLED: self.cancelled,
            ev.VOIDED: self.cancelled,
            ev.FORWARDED: self.forwarded,
        }

    async def issued(self, connection: asyncpg.Connection, event: RecordedEvent) -> None:
        await connection.execute(_REMEMBER_CARD, event.stream_id, ev.decode(event, ev.Issued).currency)

    async def transaction_created(self, connection: asyncpg.Connection, event: RecordedEvent) -> None:
        created = ev.decode(event, ev.TransactionCreated)
        await execute_one(
            connection,
            _INSERT_NATIVE,
            self.native,
            event.stream_id,
            created.transaction_id,
            ev.OPERATION_OF[event.type],
            created.value,
            created.description,
            created.request_id,
            created.order_id,
            ev.instant(created.date),
            event.position,
            event=event,
        )

    async def settled(self, connection: asyncpg.Connection, event: RecordedEvent) -> None:
        settled = ev.decode(event, ev.Settled)
        key = (self.native, event.stream_id, settled.transaction_id)
        await execute_one(connection, _ADD_TO_NATIVE, *key, settled.value, 0, 0, 0, event=event)
        await connection.execute(
            _INSERT_OPERATION,
            *key,
            settled.oid,
            SETTLEMENT,
            settled.value,
            None,
            None,
            settled.request_id,
            ev.instant(settled.date),
            event.position,
        )

    async def cancelled(self, connection: asyncpg.Connection, event: RecordedEvent) -> None:
        cancelled = ev.decode(event, ev.Cancelled)
        key = (self.native, event.stream_id, cancelled.transaction_id)
        await execute_one(
            connection,
            _ADD_TO_NATIVE,
            *key,
            0,
            cancelled.value,
            cancelled.released,
            cancelled.refunded,
            event=event,
        )
        await connection.execute(
            _INSERT_OPERATION,
            *key,
            cancelled.oid,
            CANCELLATION,
            cancelled.value,
            cancelled.released,
            cancelled.refunded,
            cancelled.request_id,
            ev.instant(cancelled.date),
            event.position,
        )

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
        await connection.execute(
            _INSERT_FORWARDED,
            call.provider_id,
            call.card_id,
            call.transaction_id or event.stream_id,  # the provider's id when the hub recorded it
            amount,
            (call.request_id or "").strip() or None,  # a blank requestId identifies nothing
            event.recorded_at,
            event.position,
            call.transaction_operation,
        )

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
