"""Read model: the balance of every native card, and how it came to be.

``available`` is the card's balance; ``credited`` and ``debited`` are its Credits and Debits
net of their cancellations (so available = credited - debited), ``authorized`` what its
Debits still hold, ``settled`` what settlements captured less what was refunded (so
debited = authorized + settled). The table's checks hold the runner to that arithmetic.
Only native cards have balances here: an external provider keeps its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ledger.eventstore.store import RecordedEvent
from projections import events as ev
from projections.projection import BatchedProjection, Handler, ProjectionBug, expect_rows

NAME = "card_balances"


# ---- a run of events, set-based (apply_run): the same arithmetic, summed per card -------------

# Cards issued in the run, with what the run did to them already in (last_activity_at: the latest of
# the issue and the run's events).
# Rows of a batch that spans many stores name each their store (the runner applies it in every store's
# scope), which each takes from its event.
_INSERT_CARDS = """
insert into read_card_balances
    (card_id, currency, relation_name, emission_date, expiring_date, issued_at, tenant_id,
     available, credited, debited, authorized, settled, last_activity_at)
select * from unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::timestamptz[],
                     $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[],
                     $13::timestamptz[])
"""

_REMEMBER_TRANSACTIONS = """
insert into read_card_balance_transactions (card_id, transaction_id, operation, tenant_id)
select * from unnest($1::text[], $2::text[], $3::text[], $4::text[])
"""

_OPERATIONS_OF = """
select t.card_id, t.transaction_id, t.operation
from read_card_balance_transactions t
join unnest($1::text[], $2::text[]) as k(card_id, transaction_id) using (card_id, transaction_id)
"""

_ADD = """
update read_card_balances b
set available = b.available + d.available, credited = b.credited + d.credited, debited = b.debited + d.debited,
    authorized = b.authorized + d.authorized, settled = b.settled + d.settled,
    last_activity_at = greatest(b.last_activity_at, d.last_activity_at)
from unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::timestamptz[])
    as d(card_id, available, credited, debited, authorized, settled, last_activity_at)
where b.card_id = d.card_id
"""

# a card's change over a run: available, credited, debited, authorized, settled, last activity
_AVAILABLE, _CREDITED, _DEBITED, _AUTHORIZED, _SETTLED, _LAST = range(6)

# ---- reads ---------------------------------------------------------------------------------

_STATUS = """
case when b.expiring_date < now() then 'expired'
     when b.emission_date > now() then 'not_yet_valid'
     else 'active' end
"""

_COLUMNS = f"""
b.card_id, b.currency, b.available, b.authorized, b.settled, b.credited, b.debited, b.relation_name,
b.emission_date, b.expiring_date, b.issued_at, b.last_activity_at, {_STATUS} as status
"""

_FILTER = f"""
from read_card_balances b
where ($1::text is null or b.currency = $1) and ($2::text is null or {_STATUS} = $2)
"""

_COUNT = f"select count(*) {_FILTER}"
_PAGE = f"select {_COLUMNS} {_FILTER} order by b.issued_at, b.card_id offset $3 limit $4"
_ONE = f"select {_COLUMNS} from read_card_balances b where b.card_id = $1"

STATUSES = ("active", "expired", "not_yet_valid")


@dataclass(frozen=True)
class BalanceFilter:
    currency: str | None = None
    status: str | None = None


class CardBalances(BatchedProjection):
    name = NAME
    tables = ("read_card_balances", "read_card_balance_transactions")
    batched = frozenset((ev.ISSUED, ev.CREDITED, ev.DEBITED, ev.SETTLED, ev.CANCELLED, ev.VOIDED))

    async def apply_run(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        """The card events' effect in five statements: new cards, new transactions, the directions of
        earlier transactions settled or cancelled here, then every touched card's sums at once."""
        cards: list[tuple[str, str, str, datetime, datetime, datetime, str]] = []
        operations: dict[tuple[str, str], str] = {}  # created in this run
        created: list[tuple[str, str, str, str]] = []
        moves: list[tuple[RecordedEvent, Any]] = []  # settlements and cancellations, in order
        deltas: dict[str, list[Any]] = {}

        def delta(card_id: str, moment: datetime) -> list[Any]:
            d = deltas.get(card_id)
            if d is None:
                d = deltas[card_id] = [0, 0, 0, 0, 0, moment]
            elif moment > d[_LAST]:
                d[_LAST] = moment
            return d

        for event in events:
            if event.name == ev.ISSUED:
                card = ev.decode(event, ev.Issued)
                cards.append((
                    event.stream_id, card.currency, card.relation_name, ev.instant(card.emission_date),
                    ev.instant(card.expiring_date), ev.instant(card.issued_at), event.tenant,
                ))  # fmt: skip
            elif event.name in (ev.CREDITED, ev.DEBITED):
                c = ev.decode(event, ev.TransactionCreated)
                operation = ev.OPERATION_OF[event.name]
                operations[(event.stream_id, c.transaction_id)] = operation
                created.append((event.stream_id, c.transaction_id, operation, event.tenant))
                d = delta(event.stream_id, ev.instant(c.date))
                if event.name == ev.CREDITED:
                    d[_AVAILABLE] += c.value
                    d[_CREDITED] += c.value
                else:
                    d[_AVAILABLE] -= c.value
                    d[_DEBITED] += c.value
                    d[_AUTHORIZED] += c.value
            else:
                shape = ev.Settled if event.name == ev.SETTLED else ev.Cancelled
                moves.append((event, ev.decode(event, shape)))

        earlier = {(e.stream_id, m.transaction_id) for e, m in moves} - operations.keys()
        if earlier:
            rows = await connection.fetch(_OPERATIONS_OF, [k[0] for k in earlier], [k[1] for k in earlier])
            operations.update({(r["card_id"], r["transaction_id"]): r["operation"] for r in rows})
        for event, move in moves:
            operation = operations.get((event.stream_id, move.transaction_id))
            if operation is None:
                raise ProjectionBug(
                    f"event {event.position} ({event.type} on {event.stream_id}) names unknown transaction"
                    f" {move.transaction_id!r}"
                )
            d = delta(event.stream_id, ev.instant(move.date))
            if operation != ev.DEBIT:
                if event.name != ev.SETTLED:  # a Credit's cancellation takes its money back
                    d[_AVAILABLE] -= move.value
                    d[_CREDITED] -= move.value
            elif event.name == ev.SETTLED:
                d[_AUTHORIZED] -= move.value
                d[_SETTLED] += move.value
            else:
                d[_AVAILABLE] += move.value
                d[_DEBITED] -= move.value
                d[_AUTHORIZED] -= move.released
                d[_SETTLED] -= move.refunded

        if cards:
            rows = []
            for card in cards:
                d = deltas.pop(card[0], None)
                issued_at = card[5]
                rows.append(
                    (*card, 0, 0, 0, 0, 0, issued_at) if d is None else (*card, *d[:5], max(issued_at, d[_LAST]))
                )
            await connection.execute(_INSERT_CARDS, *map(list, zip(*rows, strict=True)))
        if created:
            await connection.execute(_REMEMBER_TRANSACTIONS, *map(list, zip(*created, strict=True)))
        if deltas:
            columns = [list(deltas)] + [[d[i] for d in deltas.values()] for i in range(6)]
            status = await connection.execute(_ADD, *columns)
            expect_rows(status, len(deltas), "cards of card_balances", events)

    def handlers(self) -> dict[str, Handler]:
        return {}  # card events: apply_run, always


# ---- queries for the read API ----------------------------------------------------------------


async def list_balances(
    connection: asyncpg.Connection, where: BalanceFilter, offset: int, limit: int
) -> tuple[list[asyncpg.Record], int]:
    """A page of balances in issue order, and how many match in all (one snapshot for both)."""
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        total = await connection.fetchval(_COUNT, where.currency, where.status)
        rows = await connection.fetch(_PAGE, where.currency, where.status, offset, limit)
    return rows, total


async def one_balance(connection: asyncpg.Connection, card_id: str) -> asyncpg.Record | None:
    return await connection.fetchrow(_ONE, card_id)
