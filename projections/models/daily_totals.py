"""Read model: what happened each UTC day, per currency and provider, and what is still owed.

What is counted (amounts in minor units of the currency; gross flows, each on the day it
happened by the ledger's clock, or when the hub recorded a forwarded call):

- ``cards_issued``: cards issued (native), or created through the hub at an external provider;
- ``transactions``: transactions created;
- ``loaded``: Credit transactions' values; ``redeemed``: Debit transactions' values (the
  authorization); ``unclassified``: forwarded transactions recorded before the hub noted their direction;
- ``settled``: settlements' values; ``cancelled``: cancellations' values (released and refunded);
- ``balance_change``: the net change of what native cards hold (Credits, less Debits, plus
  cancelled Debits, less cancelled Credits). Its running sum, computed when read, is the
  outstanding liability at the end of each day.

External providers count only calls the provider answered "ok" (a timeout's effect is unknown);
their currency is not recorded (null, amounts in 10^-4 units) and their balances are theirs,
so they have no liability here. A create-transaction replayed with the same requestId counts once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from datetime import date

import asyncpg

from ledger.domain.giftcard import CREDIT, DEBIT
from ledger.eventstore.store import RecordedEvent
from projections import events as ev
from projections.projection import BatchedProjection, Handler, ProjectionBug

log = logging.getLogger(__name__)

NAME = "daily_totals"
CURRENCIES_REMEMBERED_MAX = 100_000  # cards, about 10 MB


@dataclass(frozen=True)
class Flows:
    """One event's contribution to its day's row, in the table's column order."""

    cards_issued: int = 0
    transactions: int = 0
    loaded: int = 0
    redeemed: int = 0
    unclassified: int = 0
    settled: int = 0
    cancelled: int = 0
    balance_change: int = 0


_ACCUMULATE = """
on conflict (tenant_id, day, provider, (coalesce(currency, ''))) do update set
    cards_issued = t.cards_issued + excluded.cards_issued,
    transactions = t.transactions + excluded.transactions,
    loaded = t.loaded + excluded.loaded,
    redeemed = t.redeemed + excluded.redeemed,
    unclassified = t.unclassified + excluded.unclassified,
    settled = t.settled + excluded.settled,
    cancelled = t.cancelled + excluded.cancelled,
    balance_change = t.balance_change + excluded.balance_change
"""

_INTO = """
insert into read_daily_totals as t
    (day, currency, provider, cards_issued, transactions, loaded, redeemed, unclassified, settled, cancelled,
     balance_change)
"""

# $1 day, $2 currency, $3 provider, $4..$11 Flows
_ADD = f"{_INTO} values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) {_ACCUMULATE}"


_FIRST_FORWARDED_REQUEST = """
insert into read_daily_totals_forwarded_requests (provider, card_id, request_id) values ($1, $2, $3)
on conflict do nothing returning true
"""

# ---- a run of native events, set-based (apply_run): flows summed per day and currency ----------

# Rows of a batch that spans many stores name each their store (the runner applies it in every store's
# scope): a card's and a transaction's by its event, a day's by its card's.
_REMEMBER_CARDS = """
insert into read_daily_totals_cards (card_id, currency, tenant_id)
select * from unnest($1::text[], $2::text[], $3::text[])
"""
_REMEMBER_TRANSACTIONS = """
insert into read_daily_totals_transactions (card_id, transaction_id, operation, tenant_id)
select * from unnest($1::text[], $2::text[], $3::text[], $4::text[])
"""
_CURRENCIES_OF = "select card_id, currency from read_daily_totals_cards where card_id = any($1::text[])"
_OPERATIONS_OF = """
select t.card_id, t.transaction_id, t.operation
from read_daily_totals_transactions t
join unnest($1::text[], $2::text[]) as k(card_id, transaction_id) using (card_id, transaction_id)
"""
_ADD_ALL = f"""
insert into read_daily_totals as t
    (tenant_id, day, currency, provider, cards_issued, transactions, loaded, redeemed, unclassified, settled,
     cancelled, balance_change)
select d.tenant_id, d.day, d.currency, $1, d.cards_issued, d.transactions, d.loaded, d.redeemed, d.unclassified,
       d.settled, d.cancelled, d.balance_change
from unnest($2::text[], $3::date[], $4::text[], $5::int[], $6::int[], $7::bigint[], $8::bigint[], $9::bigint[],
            $10::bigint[], $11::bigint[], $12::bigint[])
    as d(tenant_id, day, currency, cards_issued, transactions, loaded, redeemed, unclassified, settled, cancelled,
         balance_change)
{_ACCUMULATE}
"""

# the Flows fields, by position
_CARDS_ISSUED, _TRANSACTIONS, _LOADED, _REDEEMED, _UNCLASSIFIED, _SETTLED, _CANCELLED, _BALANCE_CHANGE = range(8)

# ---- reads ---------------------------------------------------------------------------------
# Every day from a group's first activity to the last day with any activity (or `until`, up to
# today), so that a quiet day still shows the liability carried over from the day before.

_ROWS = """
with flows as (  -- summed over the tenants in scope: one for a store, every one for an operator
    select day, provider, currency,
           sum(cards_issued)::bigint as cards_issued, sum(transactions)::bigint as transactions,
           sum(loaded)::bigint as loaded, sum(redeemed)::bigint as redeemed,
           sum(unclassified)::bigint as unclassified, sum(settled)::bigint as settled,
           sum(cancelled)::bigint as cancelled, sum(balance_change)::bigint as balance_change
    from read_daily_totals
    where ($1::text is null or currency = $1) and ($2::text is null or provider = $2)
    group by day, provider, currency
), groups as (
    select provider, currency, min(day) as first_day from flows group by provider, currency
), calendar as (
    select g.provider, g.currency, d::date as day
    from groups g,
         generate_series(
             g.first_day,
             case when $4::date is null then (select max(day) from read_daily_totals)
                  else greatest((select max(day) from read_daily_totals), least($4::date, current_date)) end,
             interval '1 day') as d
), running as (
    select c.day, c.currency, c.provider,
           coalesce(f.cards_issued, 0) as cards_issued, coalesce(f.transactions, 0) as transactions,
           coalesce(f.loaded, 0) as loaded, coalesce(f.redeemed, 0) as redeemed,
           coalesce(f.unclassified, 0) as unclassified, coalesce(f.settled, 0) as settled,
           coalesce(f.cancelled, 0) as cancelled, coalesce(f.balance_change, 0) as balance_change,
           sum(coalesce(f.balance_change, 0)) over (partition by c.provider, c.currency order by c.day) as liability
    from calendar c
    left join flows f on f.day = c.day and f.provider = c.provider and f.currency is not distinct from c.currency
)
select * from running where ($3::date is null or day >= $3) and ($4::date is null or day <= $4)
"""

_COUNT = f"select count(*) from ({_ROWS}) counted"
_PAGE = f"{_ROWS} order by day, provider, currency nulls first offset $5 limit $6"


@dataclass(frozen=True)
class TotalsFilter:
    currency: str | None = None
    provider: str | None = None
    since: date | None = None  # inclusive
    until: date | None = None  # inclusive


class DailyTotals(BatchedProjection):
    name = NAME
    batched = frozenset((ev.ISSUED, ev.CREDITED, ev.DEBITED, ev.SETTLED, ev.CANCELLED, ev.VOIDED))
    tables = (
        "read_daily_totals",
        "read_daily_totals_cards",
        "read_daily_totals_transactions",
        "read_daily_totals_forwarded_requests",
    )

    def __init__(self, native_provider_id: str) -> None:
        self.native = native_provider_id
        # Cards' currencies seen by this instance: a card's never changes, so a batch reads from
        # read_daily_totals_cards only those of cards it meets for the first time (that read was as
        # costly as the balance update under row-level security). Forgotten all at once when full.
        self._currencies: dict[str, str] = {}

    def handlers(self) -> dict[str, Handler]:
        return {ev.FORWARDED: self.forwarded}  # card events: apply_run, always

    async def apply_run(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        """The card events' effect in at most five statements: cards, transactions, the currencies and
        directions of earlier ones this run needs, then each (day, currency)'s summed flows at once."""
        currencies: dict[str, str] = {}  # of cards issued in this run, then of every card it needs
        cards: list[tuple[str, str, str]] = []
        operations: dict[tuple[str, str], str] = {}
        created_here: list[tuple[str, str, str, str]] = []
        decoded: list[tuple[RecordedEvent, object]] = []
        for event in events:
            if event.name == ev.ISSUED:
                card = ev.decode(event, ev.Issued)
                currencies[event.stream_id] = card.currency
                cards.append((event.stream_id, card.currency, event.tenant))
                decoded.append((event, card))
            elif event.name in (ev.CREDITED, ev.DEBITED):
                created = ev.decode(event, ev.TransactionCreated)
                operations[(event.stream_id, created.transaction_id)] = ev.OPERATION_OF[event.name]
                created_here.append(
                    (event.stream_id, created.transaction_id, ev.OPERATION_OF[event.name], event.tenant)
                )
                decoded.append((event, created))
            else:
                decoded.append((event, ev.decode(event, ev.Settled if event.name == ev.SETTLED else ev.Cancelled)))

        unknown_cards = {e.stream_id for e, _ in decoded} - currencies.keys()
        currencies.update({card: self._currencies[card] for card in unknown_cards & self._currencies.keys()})
        unknown_cards -= self._currencies.keys()
        if unknown_cards:
            rows = await connection.fetch(_CURRENCIES_OF, list(unknown_cards))
            currencies.update({r["card_id"]: r["currency"] for r in rows})
        earlier = {
            (e.stream_id, m.transaction_id) for e, m in decoded if e.name in (ev.CANCELLED, ev.VOIDED)
        } - operations.keys()
        if earlier:
            rows = await connection.fetch(_OPERATIONS_OF, [k[0] for k in earlier], [k[1] for k in earlier])
            operations.update({(r["card_id"], r["transaction_id"]): r["operation"] for r in rows})

        flows: dict[tuple[str, date, str], list[int]] = {}  # (tenant, day, currency)
        for event, m in decoded:
            currency = currencies.get(event.stream_id)
            if currency is None:
                raise ProjectionBug(f"event {event.position} ({event.type} on {event.stream_id}): no such card")
            if event.name == ev.ISSUED:
                f = flows.setdefault((event.tenant, ev.utc_day(ev.instant(m.issued_at)), currency), [0] * 8)
                f[_CARDS_ISSUED] += 1
                continue
            f = flows.setdefault((event.tenant, ev.utc_day(ev.instant(m.date)), currency), [0] * 8)
            if event.name == ev.CREDITED:
                f[_TRANSACTIONS] += 1
                f[_LOADED] += m.value
                f[_BALANCE_CHANGE] += m.value
            elif event.name == ev.DEBITED:
                f[_TRANSACTIONS] += 1
                f[_REDEEMED] += m.value
                f[_BALANCE_CHANGE] -= m.value
            elif event.name == ev.SETTLED:
                f[_SETTLED] += m.value
            else:
                operation = operations.get((event.stream_id, m.transaction_id))
                if operation is None:
                    raise ProjectionBug(
                        f"event {event.position} ({event.type} on {event.stream_id}) names unknown transaction"
                        f" {m.transaction_id!r}"
                    )
                f[_CANCELLED] += m.value
                f[_BALANCE_CHANGE] += m.value if operation == DEBIT else -m.value

        self._remember(currencies)
        if cards:
            await connection.execute(_REMEMBER_CARDS, *map(list, zip(*cards, strict=True)))
        if created_here:
            await connection.execute(_REMEMBER_TRANSACTIONS, *map(list, zip(*created_here, strict=True)))
        if flows:
            keys = list(flows)
            columns = [[k[i] for k in keys] for i in range(3)] + [[f[i] for f in flows.values()] for i in range(8)]
            await connection.execute(_ADD_ALL, self.native, *columns)

    def _remember(self, currencies: dict[str, str]) -> None:
        if len(self._currencies) + len(currencies) > CURRENCIES_REMEMBERED_MAX:
            self._currencies.clear()
        self._currencies.update(currencies)

    async def forwarded(self, connection: asyncpg.Connection, event: RecordedEvent) -> None:
        call = ev.decode(event, ev.Forwarded)
        if not ev.forwarded_money(call):
            return
        flows = await self._forwarded_flows(connection, event, call)
        if flows is not None:
            day = ev.utc_day(event.recorded_at)
            await connection.execute(_ADD, day, None, call.provider_id, *astuple(flows))

    async def _forwarded_flows(
        self, connection: asyncpg.Connection, event: RecordedEvent, call: ev.Forwarded
    ) -> Flows | None:
        """What a forwarded call adds, or None: not exact, or a replay already counted."""
        if call.operation == ev.FORWARDED_CREATE_CARD:
            return Flows(cards_issued=1)
        amount = ev.forwarded_amount(call.value)
        if amount is None:
            log.warning("forwarded call at position %d has no exact amount; not counted", event.position)
            return None
        if call.operation == ev.FORWARDED_SETTLE:
            return Flows(settled=amount)
        if call.operation == ev.FORWARDED_CANCEL:
            return Flows(cancelled=amount)
        request_id = (call.request_id or "").strip()
        if request_id and call.card_id is not None:
            first = await connection.fetchval(_FIRST_FORWARDED_REQUEST, call.provider_id, call.card_id, request_id)
            if not first:
                return None
        if call.transaction_operation == CREDIT:
            return Flows(transactions=1, loaded=amount)
        if call.transaction_operation == DEBIT:
            return Flows(transactions=1, redeemed=amount)
        return Flows(transactions=1, unclassified=amount)


# ---- queries for the read API ----------------------------------------------------------------


async def list_totals(
    connection: asyncpg.Connection, where: TotalsFilter, offset: int, limit: int
) -> tuple[list[asyncpg.Record], int]:
    """A page of days (oldest first) with their flows and end-of-day liability, and the total."""
    filters = (where.currency, where.provider, where.since, where.until)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        total = await connection.fetchval(_COUNT, *filters)
        rows = await connection.fetch(_PAGE, *filters, offset, limit)
    return rows, total
