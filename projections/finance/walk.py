"""Every card replayed through the domain once, each change of what it owes as a ``Movement``.

One server-side cursor in (stream_id, version) order, inside one read-only repeatable-read
snapshot, one card in memory at a time (as ``export liabilities`` walks). A card's events are
placed on the ledger's clock (their effective time), made monotonic within the card: once an
event is at or past an instant, nothing after it counts before that instant, as ``export
liabilities`` cuts a stream. Each movement names the event behind it (position and version), so
every figure built from them can be traced back.

After each event the movements it made must add up to the change the domain made to the balance
(or, past expiry, to nothing): the identity the roll-forward rests on is checked per event here,
and per card and per currency by the reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import msgspec

from ledger.domain.giftcard import CREDIT, GiftCard
from ledger.eventstore.store import RecordedEvent
from projections import events as ev
from projections.audit.replay import (
    CANCELLATION,
    CARD_TOPICS,
    EVENT_COLUMNS,
    SETTLEMENT,
    TRANSACTION,
    CardReplay,
    Step,
    balance_figures,
    cursor_batches,
    effective_at,
    read_decoded,
)
from projections.exports.export_files import EXPORT_BATCH_ROWS, LedgerInconsistent
from projections.finance.config import BREAKAGE, UNCLAIMED_PROPERTY, FinanceConfig
from projections.finance.liability import card_liability

# What changes what a card owes (``change`` signed: + the card owes more).
LOADED = "loaded"  # a Credit
LOAD_CANCELLED = "load_cancelled"  # a Credit cancelled (released or refunded)
REDEEMED = "redeemed"  # a Debit: its hold counts as redeemed at once (see ``liability``)
REDEMPTION_RELEASED = "redemption_released"  # a Debit's hold released: a cancellation or an expired hold's void
REDEMPTION_REFUNDED = "redemption_refunded"  # a settled Debit refunded
EXPIRED_TO = {BREAKAGE: "expired_to_breakage", UNCLAIMED_PROPERTY: "expired_to_unclaimed_property"}
LIABILITY_MOVEMENTS = (
    LOADED,
    LOAD_CANCELLED,
    REDEEMED,
    REDEMPTION_RELEASED,
    REDEMPTION_REFUNDED,
    *EXPIRED_TO.values(),
)
# Facts that change nothing owed, kept for memo lines (``change`` 0).
ISSUED = "issued"
SETTLED = "settled"
SHOPPER_ACTIVITY = (LOADED, REDEEMED)  # what dormancy counts: the card used, not an order processed

CARD_EVENTS = f"select {EVENT_COLUMNS} from events e where e.type = any($1::text[]) order by e.stream_id, e.version"


class Movement(msgspec.Struct, frozen=True):
    kind: str
    at: datetime  # effective, monotonic within the card
    change: int  # minor units: what the card owes afterwards less before
    amount: int  # minor units moved (for a memo fact such as a settlement, ``change`` is 0)
    position: int  # the event behind it (an expiry: the issue, which carries the expiring date)
    version: int
    transaction_id: str | None


@dataclass
class CardFacts:
    card_id: str
    currency: str
    issued_at: datetime
    expiring_date: datetime
    movements: list[Movement] = field(default_factory=list)
    owed: dict[datetime, int] = field(default_factory=dict)  # ``card_liability`` at each instant asked for
    held: dict[datetime, int] = field(default_factory=dict)  # what Debits still held then (memo)

    def changes_between(self, start: datetime, end: datetime) -> int:
        return sum(m.change for m in self.movements if start <= m.at < end)


async def walk_cards(
    pool: asyncpg.Pool,
    instants: list[datetime],
    config: FinanceConfig,
    on_card: Callable[[CardFacts], None],
    *,
    batch_rows: int = EXPORT_BATCH_ROWS,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Hands each card's facts, with what it owed at each of ``instants``, to ``on_card``; raises
    LedgerInconsistent if a card cannot be replayed or its movements do not add up to its balance."""
    walk: _CardWalk | None = None
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        async for batch in cursor_batches(connection, CARD_EVENTS, (list(CARD_TOPICS),), batch_rows):
            for row in batch:
                event, state = read_decoded(row)
                if walk is None or walk.replay.stream_id != event.stream_id:
                    if walk is not None:
                        on_card(walk.finish())
                    walk = _CardWalk(CardReplay(event.stream_id), sorted(instants), config)
                walk.apply(event, state)
            if on_progress is not None:
                on_progress(len(batch))
        if walk is not None:
            on_card(walk.finish())


class _CardWalk:
    def __init__(self, replay: CardReplay, instants: list[datetime], config: FinanceConfig) -> None:
        self.replay = replay
        self.pending = instants  # not reached yet, in order
        self.config = config
        self.at: datetime | None = None
        self.expired = False
        self.issue: RecordedEvent | None = None
        self.facts: CardFacts | None = None

    def apply(self, event: RecordedEvent, state: object) -> None:
        at = effective_at(event, state)
        at = at if self.at is None or at >= self.at else self.at
        self.at = at
        self._reach(at)
        card = self.replay.card
        if card is not None and not self.expired and card.is_expired(at):
            self._expire(card)
        before = 0 if card is None else card.balance
        step, failures = self.replay.apply(event, state)
        if step is None:
            raise LedgerInconsistent(f"{failures[0].line()}; run giftcard audit verify")
        if self.facts is None:
            self._start(event)
        moved = _movements(step, at)
        self._check_adds_up(event, moved, step.balance - before)
        self.facts.movements += moved
        changed = sum(m.change for m in moved)
        if self.expired and changed:  # value back on an expired card expires again at once
            self.facts.movements.append(self._expiry(at, -changed, event))

    def finish(self) -> CardFacts:
        card = self.replay.card
        assert card is not None and self.facts is not None  # a stream's first card event is its issue
        self._reach(None)
        if not self.expired:
            self._expire(card)
        return self.facts

    def _start(self, event: RecordedEvent) -> None:
        card = self.replay.card
        if event.type != ev.ISSUED or card is None:
            raise LedgerInconsistent(
                f"card {event.stream_id} has money events but no issue event; run giftcard audit verify"
            )
        self.issue = event
        self.facts = CardFacts(event.stream_id, card.currency, card.issued_at, card.expiring_date)

    def _reach(self, at: datetime | None) -> None:
        """Records what the card owed at every instant up to ``at`` (None: all of them)."""
        card = self.replay.card
        if card is None or self.facts is None:  # before the issue: the issue itself owes nothing
            return
        while self.pending and (at is None or self.pending[0] <= at):
            instant = self.pending.pop(0)
            self.facts.owed[instant] = card_liability(card, instant)
            self.facts.held[instant] = balance_figures(card).authorized

    def _expire(self, card: GiftCard) -> None:
        """The value left when the card expired leaves the liability at its expiring instant."""
        self.expired = True
        if card.balance and self.issue is not None and self.facts is not None:
            self.facts.movements.append(self._expiry(card.expiring_date, -card.balance, self.issue))

    def _expiry(self, at: datetime, change: int, event: RecordedEvent) -> Movement:
        assert self.facts is not None
        kind = EXPIRED_TO[self.config.expiry_destination(self.facts.currency)]
        return Movement(kind, at, change, abs(change), event.position, event.version, None)

    def _check_adds_up(self, event: RecordedEvent, moved: list[Movement], balance_change: int) -> None:
        if sum(m.change for m in moved) != balance_change:
            raise LedgerInconsistent(
                f"{event.stream_id} version {event.version}: the movements found add up to "
                f"{sum(m.change for m in moved)}, the balance moved {balance_change} (minor units); "
                "run giftcard audit verify"
            )


def _movements(step: Step, at: datetime) -> list[Movement]:
    """What one replayed event changed in what the card owes (and its memo facts)."""
    event, transaction = step.event, step.transaction
    transaction_id = None if transaction is None else transaction.id

    def movement(kind: str, change: int, amount: int) -> Movement:
        return Movement(kind, at, change, amount, event.position, event.version, transaction_id)

    if step.kind is None:
        return [movement(ISSUED, 0, 0)]
    amount = step.amount or 0
    is_credit = transaction is not None and transaction.operation == CREDIT
    if step.kind == TRANSACTION:
        return [movement(LOADED, amount, amount) if is_credit else movement(REDEEMED, -amount, amount)]
    if step.kind == SETTLEMENT:
        return [movement(SETTLED, 0, amount)]
    assert step.kind == CANCELLATION
    if is_credit:
        return [movement(LOAD_CANCELLED, -amount, amount)]
    released, refunded = step.released or 0, step.refunded or 0
    return [
        movement(kind, part, part)
        for kind, part in ((REDEMPTION_RELEASED, released), (REDEMPTION_REFUNDED, refunded))
        if part
    ]
