"""``audit verify``'s comparison of every read model with a fresh replay of the events.

A read model is exactly as fresh as its checkpoint: it has applied every event at or below
it in each source's commit order and none after (ledger.eventstore.commit_order). So each card is compared as it stood
after the last event its projection applied (inside one stream that is a prefix: a stream's
versions commit in order), and later events are counted as lag, never as a difference.
Everything runs inside verify's one read-only repeatable-read transaction, in which the
read-model rows and their checkpoint are one consistent snapshot.

Memory stays bounded: a card's expected figures wait in a buffer of at most
``CARDS_PER_CHECK_MAX`` cards (``TRANSACTIONS_PER_CHECK_MAX`` transactions), which one query
per read model then compares; daily totals are accumulated per (day, currency, provider),
which grows with the calendar, not with the number of events.

Rows that no event creates (phantoms) are named by queries that join every row with the events;
they run only when the walked cards leave some row of their read model unexplained (see ``explained``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import asyncpg

from ledger.domain.giftcard import DEBIT
from ledger.domain.topics import stored_types
from ledger.eventstore.commit_order import START, Checkpoint, earliest
from ledger.eventstore.store import RecordedEvent
from projections import events as ev
from projections.audit.replay import (
    CANCELLATION,
    SETTLEMENT,
    TRANSACTION,
    TRANSACTION_STORED_TYPES,
    BalanceFigures,
    CardReplay,
    Failure,
    Step,
    TransactionFigures,
    balance_figures,
    effective_at,
    is_applied,
    transaction_figures,
)
from projections.exports.totals import major
from projections.forwarded import ForwardedMove
from projections.models import card_balances, daily_totals, transaction_history
from projections.models.daily_totals import Flows

CARDS_PER_CHECK_MAX = 500
TRANSACTIONS_PER_CHECK_MAX = 5_000
PHANTOMS_NAMED_MAX = 10  # rows with no events behind them, named per read model

RULE_CARD_BALANCES = f"read_model_{card_balances.NAME}"
RULE_TRANSACTION_HISTORY = f"read_model_{transaction_history.NAME}"
RULE_DAILY_TOTALS = f"read_model_{daily_totals.NAME}"
PROJECTIONS = (card_balances.NAME, transaction_history.NAME, daily_totals.NAME)

_CHECKPOINTS = "select name, checkpoint::text from projection_checkpoints where name = any($1::text[])"

_BALANCES_OF = """
select card_id, currency, available, authorized, settled, credited, debited
from read_card_balances where card_id = any($1::text[])
"""

# The operations counted per card in one grouped pass, not by a subquery per transaction (~4x cheaper).
_TRANSACTIONS_OF = """
select t.card_id, t.transaction_id, t.operation, t.currency, t.value, t.settled, t.cancelled, t.released, t.refunded,
       coalesce(o.operations, 0) as operations
from read_transactions t
left join (select card_id, transaction_id, count(*) as operations from read_transaction_operations
           where provider = $1 and card_id = any($2::text[]) group by card_id, transaction_id) o
  on o.card_id = t.card_id and o.transaction_id = t.transaction_id
where t.provider = $1 and t.card_id = any($2::text[])
"""

# How many rows each card read model holds: when a walked card explains every one of them (see
# ``ReadModelCheck.explained``), none can be a phantom, and the queries that name phantoms, which join
# every row with the events, need not run.
_ROWS_HELD = {
    card_balances.NAME: "select count(*) from read_card_balances",
    transaction_history.NAME: "select count(*) from read_transactions where provider = $1",
}

# Rows whose card (or transaction) no event at or below the checkpoint creates. Set differences, not
# a correlated NOT EXISTS: on Citus the read models are local tables and the events are sharded, and a
# local table cannot be joined with a distributed one directly (the events' side is read first).
_PHANTOM_CARDS = """
select card_id from (
    select card_id from read_card_balances
    except
    select stream_id from events e
    where e.version = 1 and e.type = any($1::text[]) and e.seq <= coalesce(($2::jsonb ->> e.source::text)::bigint, 0)
) phantom
order by card_id limit $3
"""

_PHANTOM_TRANSACTIONS = """
select card_id, transaction_id from (
    select card_id, transaction_id from read_transactions where provider = $1
    except
    select stream_id, data->>'transaction_id' from events e
    where e.type = any($2::text[]) and e.seq <= coalesce(($3::jsonb ->> e.source::text)::bigint, 0)
) phantom
order by card_id, transaction_id limit $4
"""

_FORWARDED_TOTALS = """
select provider, count(value) as transactions, coalesce(sum(value), 0) as value,
       sum(settled) as settled, sum(cancelled) as cancelled
from read_transactions where source = 'forwarded' group by provider order by provider
"""

# Summed over the tenants in scope, as the replay counts every card it walks (one tenant, or every one).
_DAILY_TOTALS = """
select day, currency, provider, sum(cards_issued)::bigint as cards_issued, sum(transactions)::bigint as transactions,
       sum(loaded)::bigint as loaded, sum(redeemed)::bigint as redeemed, sum(unclassified)::bigint as unclassified,
       sum(settled)::bigint as settled, sum(cancelled)::bigint as cancelled, sum(balance_change)::bigint as balance_change
from read_daily_totals group by day, currency, provider order by day, provider, currency
"""

_FLOW_NAMES = [f.name for f in fields(Flows)]
_FLOW = {name: index for index, name in enumerate(_FLOW_NAMES)}  # a flow's place in a day's list


@dataclass(frozen=True)
class ReadModelResult:
    name: str
    checkpoint: Checkpoint
    compared: int  # rows (cards, transactions, days) compared
    lag_events: int  # events after the checkpoint: not projected yet, so not compared


@dataclass(frozen=True)
class ShareFigures:
    """A share of the walk's daily and forwarded flows, comparisons and lag (plain dicts: they are pickled)."""

    days: dict[tuple, list[int]]
    forwarded: dict[str, list[int]]
    compared: dict[str, int]
    lag_events: dict[str, int]
    explained: dict[str, int]


@dataclass
class _CardExpectation:
    card_id: str
    version: int | None  # the last event the projection applied, named in any failure
    position: int | None
    issued_first: bool  # the stream's version 1 is the card's issue (what the phantom query looks for)
    balances: BalanceFigures | None = None  # None: no card yet at the checkpoint
    transactions: dict[str, TransactionFigures] | None = None


async def load_checkpoints(connection: asyncpg.Connection) -> dict[str, Checkpoint]:
    rows = await connection.fetch(_CHECKPOINTS, list(PROJECTIONS))
    found = {row["name"]: Checkpoint.from_json(row["checkpoint"]) for row in rows}
    return {name: found.get(name, START) for name in PROJECTIONS}


class ReadModelCheck:
    def __init__(
        self,
        connection: asyncpg.Connection,
        native_provider_id: str,
        checkpoints: dict[str, Checkpoint],
        found: Callable[[Failure], None],
        *,
        cards_per_check_max: int = CARDS_PER_CHECK_MAX,
        transactions_per_check_max: int = TRANSACTIONS_PER_CHECK_MAX,
    ) -> None:
        self.connection = connection
        self.cards_per_check_max = cards_per_check_max
        self.transactions_per_check_max = transactions_per_check_max
        self.native = native_provider_id
        self.checkpoints = checkpoints
        self.found = found
        self.compared: defaultdict[str, int] = defaultdict(int)
        self.lag_events: defaultdict[str, int] = defaultdict(int)
        # Rows of card_balances and transaction_history that a walked card creates by an event at or
        # below the checkpoint (a row the phantom queries cannot name): see _ROWS_HELD.
        self.explained: defaultdict[str, int] = defaultdict(int)
        self._issued_first = False
        self._balances: list[_CardExpectation] = []
        self._transactions: list[_CardExpectation] = []
        self._buffered_transactions = 0
        self._pending: set[str] = set()
        self._days: defaultdict[tuple, list[int]] = defaultdict(lambda: [0] * len(_FLOW_NAMES))
        self._forwarded: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._oldest = earliest(checkpoints[name] for name in PROJECTIONS)

    def applied(self, name: str, event: RecordedEvent) -> bool:
        return is_applied(event, self.checkpoints[name])

    def applied_by_all(self, event: RecordedEvent) -> bool:
        """The usual case, read models caught up: one comparison instead of one per read model."""
        return is_applied(event, self._oldest)

    def count_event(self, event: RecordedEvent) -> None:
        if self.applied_by_all(event):
            return
        for name in PROJECTIONS:
            if not self.applied(name, event):
                self.lag_events[name] += 1

    # ---- cards ---------------------------------------------------------------------------

    def card_started(self, event: RecordedEvent) -> None:
        """``event``: the card's first; its stream's first too when it is at version 1."""
        self._pending = {card_balances.NAME, transaction_history.NAME}
        self._issued_first = event.version == 1 and event.name == ev.ISSUED

    def before_card_event(self, replay: CardReplay, event: RecordedEvent) -> None:
        """The first event a projection has not applied: the card as it stands now is what it holds."""
        if self.applied_by_all(event):
            return
        for name in [n for n in self._pending if not self.applied(n, event)]:
            self._capture(name, replay)

    def card_step(self, replay: CardReplay, step: Step, state: Any) -> None:
        """``state``: the step's event's data, decoded (see ``projections.audit.replay.read_decoded``)."""
        if self.applied_by_all(step.event) or self.applied(daily_totals.NAME, step.event):
            self._add_day_flows(replay, step, state)

    def card_done(self, replay: CardReplay) -> None:
        """The card's expected figures wait for ``compare_due`` (the walk's connection is busy reading)."""
        for name in list(self._pending):
            self._capture(name, replay)

    async def compare_due(self) -> None:
        """Compares the waiting cards once a check's worth of them are waiting (called between batches)."""
        if len(self._balances) >= self.cards_per_check_max:
            await self._compare_balances()
        if (
            len(self._transactions) >= self.cards_per_check_max
            or self._buffered_transactions >= self.transactions_per_check_max
        ):
            await self._compare_transactions()

    async def compare_waiting(self) -> None:
        """Compares every card still waiting, however few (a share of the walk is done)."""
        await self._compare_balances()
        await self._compare_transactions()

    def share_figures(self) -> ShareFigures:
        """What a share of the walk adds up beyond its own cards, for the walk that compares the whole."""
        return ShareFigures(
            dict(self._days), dict(self._forwarded), dict(self.compared), dict(self.lag_events), dict(self.explained)
        )

    def add_share(self, figures: ShareFigures) -> None:
        for key, flows in figures.days.items():
            self._days[key] = [a + b for a, b in zip(self._days[key], flows, strict=True)]
        for provider, moved in figures.forwarded.items():
            self._forwarded[provider] = [a + b for a, b in zip(self._forwarded[provider], moved, strict=True)]
        for name, count in figures.compared.items():
            self.compared[name] += count
        for name, count in figures.lag_events.items():
            self.lag_events[name] += count
        for name, count in figures.explained.items():
            self.explained[name] += count

    def _capture(self, name: str, replay: CardReplay) -> None:
        self._pending.discard(name)
        if replay.broken:
            return  # already reported; what the read model holds cannot be derived
        last = replay.last_event
        expectation = _CardExpectation(
            replay.stream_id,
            None if last is None else last.version,
            None if last is None else last.position,
            self._issued_first,
        )
        if name == card_balances.NAME:
            expectation.balances = None if replay.card is None else balance_figures(replay.card)
            self._balances.append(expectation)
        else:
            expectation.transactions = {} if replay.card is None else transaction_figures(replay.card)
            self._buffered_transactions += len(expectation.transactions)
            self._transactions.append(expectation)

    def _add_day_flows(self, replay: CardReplay, step: Step, state: Any) -> None:
        assert replay.card is not None
        day = ev.utc_day(effective_at(step.event, state))
        flows = self._days[(day, replay.card.currency, self.native)]
        transaction = step.transaction
        amount = step.amount or 0
        if step.event.name == ev.ISSUED:
            flows[_FLOW["cards_issued"]] += 1
        elif step.kind == TRANSACTION and transaction is not None:
            debit = transaction.operation == DEBIT
            flows[_FLOW["transactions"]] += 1
            flows[_FLOW["redeemed" if debit else "loaded"]] += amount
            flows[_FLOW["balance_change"]] += -amount if debit else amount
        elif step.kind == SETTLEMENT:
            flows[_FLOW["settled"]] += amount
        elif step.kind == CANCELLATION and transaction is not None:
            flows[_FLOW["cancelled"]] += amount
            flows[_FLOW["balance_change"]] += amount if transaction.operation == DEBIT else -amount

    # ---- forwarded calls ---------------------------------------------------------------------

    def forwarded(self, event: RecordedEvent, call: ev.Forwarded, move: ForwardedMove | None, replay: bool) -> None:
        """A forwarded call, as transaction_history and daily_totals count it."""
        if self.applied(transaction_history.NAME, event) and move is not None and not replay:
            figures = self._forwarded[move.provider]
            if move.kind == TRANSACTION:
                figures[0] += 1
                figures[1] += move.amount
            else:
                figures[2 if move.kind == SETTLEMENT else 3] += move.amount
        if self.applied(daily_totals.NAME, event) and ev.forwarded_money(call) and not replay:
            self._add_forwarded_day_flows(event, call)

    def _add_forwarded_day_flows(self, event: RecordedEvent, call: ev.Forwarded) -> None:
        if call.operation == ev.FORWARDED_CREATE_CARD:
            added = {"cards_issued": 1}
        else:
            amount = ev.forwarded_amount(call.value)
            if amount is None:
                return
            added = {
                ev.FORWARDED_SETTLE: {"settled": amount},
                ev.FORWARDED_CANCEL: {"cancelled": amount},
            }.get(call.operation, {"transactions": 1, "unclassified": amount})
        flows = self._days[(ev.utc_day(event.recorded_at), None, call.provider_id)]
        for name, value in added.items():
            flows[_FLOW[name]] += value

    # ---- comparisons ---------------------------------------------------------------------------

    async def finish(self) -> list[ReadModelResult]:
        await self._compare_balances()
        await self._compare_transactions()
        await self._name_phantoms()
        await self._compare_forwarded()
        await self._compare_days()
        return [
            ReadModelResult(name, self.checkpoints[name], self.compared[name], self.lag_events[name])
            for name in PROJECTIONS
        ]

    async def _compare_balances(self) -> None:
        expectations, self._balances = self._balances, []
        if not expectations:
            return
        rows = await self.connection.fetch(_BALANCES_OF, [e.card_id for e in expectations])
        held = {row["card_id"]: row for row in rows}
        for expected in expectations:
            row = held.get(expected.card_id)
            self.compared[card_balances.NAME] += 1
            if expected.balances is None:
                if row is not None:
                    self._differs(
                        expected, RULE_CARD_BALANCES, "a row exists for a card not yet issued at the checkpoint"
                    )
                continue
            if row is None:
                self._differs(expected, RULE_CARD_BALANCES, "the card has no row")
                continue
            self.explained[card_balances.NAME] += expected.issued_first
            differences = _differences(expected.balances, row, expected.balances.currency)
            if differences:
                self._differs(expected, RULE_CARD_BALANCES, "; ".join(differences))

    async def _compare_transactions(self) -> None:
        expectations, self._transactions, self._buffered_transactions = self._transactions, [], 0
        if not expectations:
            return
        rows = await self.connection.fetch(_TRANSACTIONS_OF, self.native, [e.card_id for e in expectations])
        held: defaultdict[str, dict[str, asyncpg.Record]] = defaultdict(dict)
        for row in rows:
            held[row["card_id"]][row["transaction_id"]] = row
        for expected in expectations:
            self._compare_card_transactions(expected, held.get(expected.card_id, {}))

    def _compare_card_transactions(self, expected: _CardExpectation, rows: dict[str, asyncpg.Record]) -> None:
        assert expected.transactions is not None
        for transaction_id, figures in expected.transactions.items():
            self.compared[transaction_history.NAME] += 1
            row = rows.get(transaction_id)
            if row is None:
                self._differs(expected, RULE_TRANSACTION_HISTORY, f"transaction {transaction_id} has no row")
                continue
            # The replay holds it: a Credited or Debited event with its id, at or below the checkpoint.
            self.explained[transaction_history.NAME] += 1
            differences = _differences(figures, row, figures.currency)
            if differences:
                self._differs(
                    expected, RULE_TRANSACTION_HISTORY, f"transaction {transaction_id}: " + "; ".join(differences)
                )
        for transaction_id in rows.keys() - expected.transactions.keys():
            self._differs(expected, RULE_TRANSACTION_HISTORY, f"transaction {transaction_id} has a row but no event")

    async def _name_phantoms(self) -> None:
        """Rows of cards (or transactions) that no event behind the checkpoint creates at all."""
        if await self._unexplained(card_balances.NAME):
            await self._name_phantom_cards()
        if await self._unexplained(transaction_history.NAME, self.native):
            await self._name_phantom_transactions()

    async def _unexplained(self, name: str, *args: object) -> bool:
        """Whether some row of a card read model is not one a walked card explains."""
        return await self.connection.fetchval(_ROWS_HELD[name], *args) > self.explained[name]

    async def _name_phantom_cards(self) -> None:
        balances = self.checkpoints[card_balances.NAME]
        for row in await self.connection.fetch(
            _PHANTOM_CARDS, stored_types(ev.ISSUED), balances.to_json(), PHANTOMS_NAMED_MAX
        ):
            self.found(
                Failure(row["card_id"], None, None, RULE_CARD_BALANCES, "a row exists for a card with no events")
            )

    async def _name_phantom_transactions(self) -> None:
        history = self.checkpoints[transaction_history.NAME]
        for row in await self.connection.fetch(
            _PHANTOM_TRANSACTIONS,
            self.native,
            TRANSACTION_STORED_TYPES,
            history.to_json(),
            PHANTOMS_NAMED_MAX,
        ):
            message = f"transaction {row['transaction_id']} has a row but no event"
            self.found(Failure(row["card_id"], None, None, RULE_TRANSACTION_HISTORY, message))

    async def _compare_forwarded(self) -> None:
        names = ("transactions", "value", "settled", "cancelled")
        expected = dict(self._forwarded)
        for row in await self.connection.fetch(_FORWARDED_TOTALS):
            figures = expected.pop(row["provider"], [0, 0, 0, 0])
            self.compared[transaction_history.NAME] += 1
            held = [row[name] for name in names]
            if held != figures:
                message = f"forwarded totals of provider {row['provider']}: " + _listed(names, held, figures, None)
                self.found(Failure(None, None, None, RULE_TRANSACTION_HISTORY, message))
        for provider, figures in expected.items():
            if any(figures):
                message = f"forwarded totals of provider {provider}: no rows, replay has " + _listed(
                    names, [0] * len(names), figures, None
                )
                self.found(Failure(None, None, None, RULE_TRANSACTION_HISTORY, message))

    async def _compare_days(self) -> None:
        expected = self._days
        for row in await self.connection.fetch(_DAILY_TOTALS):
            key = (row["day"], row["currency"], row["provider"])
            figures = expected.pop(key, [0] * len(_FLOW_NAMES))
            self.compared[daily_totals.NAME] += 1
            held = [row[name] for name in _FLOW_NAMES]
            if held != figures:
                self._day_differs(key, held, figures)
        for key, figures in expected.items():
            if any(figures):
                self._day_differs(key, [0] * len(_FLOW_NAMES), figures)
        self._days = defaultdict(lambda: [0] * len(_FLOW_NAMES))

    def _day_differs(self, key: tuple, held: list[int], figures: list[int]) -> None:
        day, currency, provider = key
        counts = {"cards_issued", "transactions"}
        differing = [
            f"{name} {_shown(h, None if name in counts else currency, name in counts)} in read model, "
            f"{_shown(f, None if name in counts else currency, name in counts)} by replay"
            for name, h, f in zip(_FLOW_NAMES, held, figures, strict=True)
            if h != f
        ]
        message = f"day {day.isoformat()} {currency or '(currency not recorded)'} {provider}: " + "; ".join(differing)
        self.found(Failure(None, None, None, RULE_DAILY_TOTALS, message))

    def _differs(self, expected: _CardExpectation, rule: str, message: str) -> None:
        self.found(Failure(expected.card_id, expected.version, expected.position, rule, message))


def _differences(figures: BalanceFigures | TransactionFigures, row: asyncpg.Record, currency: str) -> list[str]:
    """``name X in read model, Y by replay`` for every field that differs (amounts in major units)."""
    differences = []
    for name in type(figures).__struct_fields__:
        value, held = getattr(figures, name), row[name]
        if held != value:
            plain = name == "operations"  # a count, not an amount
            differences.append(
                f"{name} {_shown(held, currency, plain)} in read model, {_shown(value, currency, plain)} by replay"
            )
    return differences


def _listed(names: tuple[str, ...], held: list[int], figures: list[int], currency: str | None) -> str:
    return "; ".join(
        f"{name} {_shown(h, currency, name == 'transactions')} in read model, "
        f"{_shown(f, currency, name == 'transactions')} by replay"
        for name, h, f in zip(names, held, figures, strict=True)
        if h != f
    )


def _shown(value: object, currency: str | None, plain: bool) -> str:
    if plain or not isinstance(value, int):
        return str(value)
    return str(major(value, currency))
