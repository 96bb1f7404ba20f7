"""One stream at a time: its versions and hash chain, and for a gift card the domain's own replay.

The auditors (``projections.audit.auditors``) and the liabilities export (``projections.exports.export_files``) all
walk the ledger through these: ``ChainWalk`` re-derives each stored hash, and ``CardReplay``
turns stored events back into the card the ledger would load (``ledger.eventstore.codec.domain_event`` and
``.mutate``, exactly as ``Ledger._replay`` does, from each event's data as the walk decoded it
once to re-derive its canonical bytes) and checks, after every event, the rules the
domain promises. Neither stops at the first problem: an auditor wants every one named.

Times: a card event's *effective* time is the ledger's clock written inside the event (``date``;
``issued_at`` for the issue), which the hash chain covers; ``recorded_at`` is the database's
insert time and is not chained. "As of" always means the effective time.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from ledger.domain import topics
from ledger.domain.giftcard import CREDIT, DEBIT, GiftCard, Transaction
from ledger.eventstore.codec import domain_event
from ledger.eventstore.commit_order import Checkpoint
from ledger.eventstore.store import GENESIS_HASH, RecordedEvent, chain_hash, recorded_event
from projections import events as ev

CARD_TOPICS = topics.CARD_EVENTS
TRANSACTION_TOPICS = (ev.CREDITED, ev.DEBITED)
# What rows of those carry in ``type``, whichever release wrote them: for queries that filter on it.
CARD_STORED_TYPES = topics.stored_types(*CARD_TOPICS)
TRANSACTION_STORED_TYPES = topics.stored_types(*TRANSACTION_TOPICS)

# The rules an auditor checks, as they are named in every failure.
RULE_VERSIONS = "versions_contiguous"
RULE_CHAIN = "hash_chain"
RULE_REPLAY = "domain_replay"
RULE_BALANCE = "balance_not_negative"
RULE_SETTLED_RELEASED = "settled_plus_released_within_value"
RULE_REFUNDED = "refunded_within_settled"
RULE_AMOUNTS = "amounts_positive"
RULE_CANCELLATION_SPLIT = "cancellation_is_released_plus_refunded"
RULE_TRANSACTION_ID = "transaction_id_unique"
RULE_VOID = "only_debits_are_voided"
RULE_KNOWN_TYPE = "event_type_known_to_auditors"  # a new domain event must be taught to audit and exports

# The columns every walk reads; ``data`` as text so its canonical bytes can be re-derived for the hash.
# Not ``metadata``: the chain does not cover it and no rule reads it, so a walk does not pay to decode it.
EVENT_COLUMNS = (
    "e.position, e.source, e.seq, e.stream_id, e.version, e.type, e.data::text as data, e.recorded_at, e.hash"
)


class Failure(msgspec.Struct, frozen=True):
    """One thing that does not hold, named so that an auditor can find it."""

    stream_id: str | None  # the card (or other stream); None for a read-model row that belongs to none
    version: int | None
    position: int | None
    rule: str
    message: str

    def line(self) -> str:
        where = self.stream_id or "-"
        if self.version is not None:
            where += f" version {self.version}"
        if self.position is not None:
            where += f" (position {self.position})"
        return f"{where}: {self.rule}: {self.message}"


def read_event(row: asyncpg.Record) -> RecordedEvent:
    """A row selected with ``EVENT_COLUMNS``, its data in canonical bytes (what the chain hashes);
    its metadata is left empty, as it was not read."""
    return read_decoded(row)[0]


def read_decoded(row: asyncpg.Record) -> tuple[RecordedEvent, Any]:
    """``read_event``, and the event's data decoded: the one decode its canonical bytes come from,
    which a walk hands on (``state``) to whatever reads the data, so that no event is decoded twice."""
    event = recorded_event(row, metadata={})
    return event, event.state


async def cursor_batches(
    connection: asyncpg.Connection,
    sql: str,
    args: tuple[object, ...],
    batch_rows: int,
    *,
    between: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[list[asyncpg.Record]]:
    """Rows of ``sql`` in batches of at most ``batch_rows``, through a server-side cursor.

    Must run inside a transaction (the cursor lives as long as it). The next batch is asked for
    before this one is handed over, so the server reads it while the caller works on this one:
    the caller must not use the connection while it holds a batch; ``between`` runs when nothing
    is being read (per-batch statements go there). At most two batches are held here, so memory
    stays flat however many rows the query has.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    cursor = await connection.cursor(sql, *args)
    batch = await cursor.fetch(batch_rows)
    while batch:
        if between is not None:
            await between()
        reading = asyncio.ensure_future(cursor.fetch(batch_rows))
        try:
            await asyncio.sleep(0)  # lets the fetch send its request before the caller takes the loop
            yield batch
            batch = await reading
        finally:
            if not reading.done():
                reading.cancel()


def short_type(event_type: str) -> str:
    """``giftcard.Credited`` (or a legacy ``ledger.domain.giftcard:GiftCard.Credited``) -> ``Credited``."""
    return event_type.rsplit(".", 1)[-1].rsplit(":", 1)[-1]


def is_applied(event: RecordedEvent, checkpoint: Checkpoint) -> bool:
    """Whether a projection at ``checkpoint`` has applied ``event``."""
    return checkpoint.covers(event)


# ---- effective time ------------------------------------------------------------------------


class _Dated(msgspec.Struct):
    date: str | None = None
    issued_at: str | None = None


def effective_at(event: RecordedEvent, state: Any = None) -> datetime:
    """When the ledger says the event happened: its ``date`` (``issued_at`` for an issue);
    ``recorded_at`` for events that carry neither (calls forwarded to external providers).
    ``state``: the event's data already decoded (see ``read_decoded``), when the caller has it."""
    if event.name not in CARD_TOPICS:
        return event.recorded_at
    try:
        dated = msgspec.convert(_decoded(event, state), _Dated)
    except msgspec.DecodeError:
        return event.recorded_at
    written = dated.date or dated.issued_at
    if written is None:
        return event.recorded_at
    try:
        return ev.instant(written).astimezone(UTC)
    except ValueError:
        return event.recorded_at


# ---- the hash chain ------------------------------------------------------------------------


class ChainWalk:
    """A stream's versions and hashes, event by event; unlike ``verify_chain`` it reports every break.

    Each event is checked against the *stored* hash of the one before it, so one altered event
    is named once, instead of every event after it failing too.
    """

    def __init__(self) -> None:
        self.expected_version = 1
        self.previous_hash = GENESIS_HASH
        self.broken = False

    def check(self, event: RecordedEvent) -> list[Failure]:
        failures = []
        if event.version != self.expected_version:
            failures.append(
                _failure(
                    event,
                    RULE_VERSIONS,
                    f"expected version {self.expected_version}, found {event.version}: "
                    f"{abs(event.version - self.expected_version)} event(s) missing or out of place",
                )
            )
        if chain_hash(self.previous_hash, event.stream_id, event.version, event.type, event.data) != event.hash:
            failures.append(
                _failure(
                    event, RULE_CHAIN, f"{short_type(event.type)} does not match its stored hash: altered or reordered"
                )
            )
        self.expected_version = event.version + 1
        self.previous_hash = event.hash
        self.broken = self.broken or bool(failures)
        return failures


# ---- the domain replay ---------------------------------------------------------------------


TRANSACTION = "transaction"
SETTLEMENT = "settlement"
CANCELLATION = "cancellation"
# A void (an expired hold released by the ledger itself) is listed, and counted, as a cancellation.
_KIND_OF = {
    ev.CREDITED: TRANSACTION,
    ev.DEBITED: TRANSACTION,
    ev.SETTLED: SETTLEMENT,
    ev.CANCELLED: CANCELLATION,
    ev.VOIDED: CANCELLATION,
}


class _TransactionRef(msgspec.Struct):
    transaction_id: str | None = None


def transaction_id_of(event: RecordedEvent, state: Any = None) -> str | None:
    if event.name not in _KIND_OF:
        return None
    return msgspec.convert(_decoded(event, state), _TransactionRef).transaction_id


def _decoded(event: RecordedEvent, state: Any) -> Any:
    """The event's data decoded: ``state`` when the caller decoded it already, else the store's decode."""
    if state is not None:
        return state
    return msgspec.json.decode(event.data) if event.state is None else event.state


class Step(msgspec.Struct, frozen=True):
    """What one card event did, as the domain replayed it. Amounts in minor units of the card's currency.
    (A Struct, not a dataclass: one is made per event verify walks, and a Struct is made ~10x faster.)"""

    event: RecordedEvent
    kind: str | None  # "transaction", "settlement", "cancellation"; None for the issue
    transaction: Transaction | None  # the transaction it touched, as it stands after the event
    amount: int | None  # the transaction's value, or what this settlement or cancellation moved
    released: int | None  # of a cancellation: released from the hold
    refunded: int | None  # of a cancellation: refunded after settlement
    balance: int  # the card's available balance after the event


class CardReplay:
    """One card's events through the domain, with its invariants checked after each of them.

    A stored event the domain cannot apply (unknown transaction, a version out of place, bytes
    that do not decode) ends the replay of that card: what would follow is built on sand.
    """

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.card: GiftCard | None = None
        self.broken = False
        self.last_event: RecordedEvent | None = None

    @property
    def currency(self) -> str | None:
        return None if self.card is None else self.card.currency

    def apply(self, event: RecordedEvent, state: Any = None) -> tuple[Step | None, list[Failure]]:
        """Replays one event; returns what it did (None once the replay is broken) and what it broke.
        ``state``: the event's data already decoded (see ``read_decoded``), when the caller has it."""
        if self.broken:
            return None, []
        try:
            state = _decoded(event, state)
            transaction_id = transaction_id_of(event, state)
            before = self._live_transaction(transaction_id)
            failures = self._duplicate_transaction(event, before)
            before_figures = _moved(before)  # read before mutate changes the transaction in place
            if event.name == ev.ISSUED and self.card is not None:
                raise ValueError("the card was already issued; a second issue would silently reset it")
            self.card = domain_event(self._originator_id, event.version, event.type, state).mutate(self.card)
        except Exception as e:  # any refusal of the domain to apply a stored fact is what we report
            self.broken = True
            return None, [_failure(event, RULE_REPLAY, f"the domain cannot apply this event: {e!r}")]
        self.last_event = event
        transaction = self._transaction(transaction_id)
        step = self._step(event, transaction, before_figures)
        return step, [*failures, *self._invariant_failures(event, step)]

    def _live_transaction(self, transaction_id: str | None) -> Transaction | None:
        if self.card is None or transaction_id is None:
            return None
        return self.card.transactions.get(transaction_id)

    def _transaction(self, transaction_id: str | None) -> Transaction | None:
        found = self._live_transaction(transaction_id)
        # A copy of the figures, not the live object: the next event's mutate changes it in place.
        return None if found is None else msgspec.structs.replace(found)

    @functools.cached_property
    def _originator_id(self) -> uuid.UUID:
        """Parsed once per card (inside ``apply``'s try: a stream id that is no UUID is a replay failure)."""
        return uuid.UUID(self.stream_id)

    def _duplicate_transaction(self, event: RecordedEvent, before: Transaction | None) -> list[Failure]:
        if event.name in TRANSACTION_TOPICS and before is not None:
            return [_failure(event, RULE_TRANSACTION_ID, f"transaction {before.id} already exists on this card")]
        return []

    def _step(self, event: RecordedEvent, transaction: Transaction | None, before: tuple[int, int, int, int]) -> Step:
        assert self.card is not None
        kind = _KIND_OF.get(event.name)
        after = _moved(transaction)
        amount = released = refunded = None
        if kind == TRANSACTION and transaction is not None:
            amount = transaction.value
        elif kind == SETTLEMENT:
            amount = after[0] - before[0]
        elif kind == CANCELLATION:
            released, refunded = after[1] - before[1], after[2] - before[2]
            amount = after[3] - before[3]
        return Step(event, kind, transaction, amount, released, refunded, self.card.balance)

    def _invariant_failures(self, event: RecordedEvent, step: Step) -> list[Failure]:
        """The domain's promises, checked again on what the stored events actually say."""
        failures = []
        if event.name not in CARD_TOPICS:
            message = f"{event.type} changes the card but audit and exports do not count it"
            failures.append(_failure(event, RULE_KNOWN_TYPE, message))
        if step.balance < 0:
            failures.append(_failure(event, RULE_BALANCE, f"balance is {step.balance} minor units after this event"))
        if step.kind is not None and (step.amount is None or step.amount <= 0):
            failures.append(_failure(event, RULE_AMOUNTS, f"{step.kind} amount is {step.amount} minor units"))
        if step.kind == CANCELLATION:
            failures += _cancellation_split_failures(event, step)
        transaction = step.transaction
        if event.name == ev.VOIDED and transaction is not None and transaction.operation != DEBIT:
            message = f"transaction {transaction.id} is a {transaction.operation}: only a Debit's hold expires"
            failures.append(_failure(event, RULE_VOID, message))
        if transaction is not None:
            if transaction.settled + transaction.released > transaction.value:
                failures.append(
                    _failure(
                        event,
                        RULE_SETTLED_RELEASED,
                        f"transaction {transaction.id}: settled {transaction.settled} + released "
                        f"{transaction.released} > value {transaction.value} (minor units)",
                    )
                )
            if transaction.refunded > transaction.settled:
                failures.append(
                    _failure(
                        event,
                        RULE_REFUNDED,
                        f"transaction {transaction.id}: refunded {transaction.refunded} > settled "
                        f"{transaction.settled} (minor units)",
                    )
                )
            if min(transaction.settled, transaction.released, transaction.refunded) < 0:
                failures.append(
                    _failure(
                        event, RULE_AMOUNTS, f"transaction {transaction.id} has a negative settled/released/refunded"
                    )
                )
        return failures


def _cancellation_split_failures(event: RecordedEvent, step: Step) -> list[Failure]:
    try:
        cancelled = ev.decode(event, ev.Cancelled)
    except msgspec.MsgspecError as e:
        return [_failure(event, RULE_CANCELLATION_SPLIT, f"cancellation does not decode: {e}")]
    if cancelled.value == cancelled.released + cancelled.refunded:
        return []
    return [
        _failure(
            event,
            RULE_CANCELLATION_SPLIT,
            f"value {cancelled.value} != released {cancelled.released} + refunded {cancelled.refunded} (minor units)",
        )
    ]


def _moved(transaction: Transaction | None) -> tuple[int, int, int, int]:
    """(settled, released, refunded, cancelled) of a transaction; zeros before it exists."""
    if transaction is None:
        return 0, 0, 0, 0
    return transaction.settled, transaction.released, transaction.refunded, transaction.cancelled


def _failure(event: RecordedEvent, rule: str, message: str) -> Failure:
    return Failure(event.stream_id, event.version, event.position, rule, message)


# ---- figures the read models hold ----------------------------------------------------------


class BalanceFigures(msgspec.Struct, frozen=True):
    """A card as ``card_balances`` holds it, computed from the replayed card (minor units)."""

    currency: str
    available: int
    authorized: int
    settled: int
    credited: int
    debited: int


def balance_figures(card: GiftCard) -> BalanceFigures:
    credits = [t for t in card.transactions.values() if t.operation == CREDIT]
    debits = [t for t in card.transactions.values() if t.operation == DEBIT]
    return BalanceFigures(
        currency=card.currency,
        available=card.balance,
        authorized=sum(t.held for t in debits),
        settled=sum(t.settled - t.refunded for t in debits),
        credited=sum(t.value - t.cancelled for t in credits),
        debited=sum(t.value - t.cancelled for t in debits),
    )


class TransactionFigures(msgspec.Struct, frozen=True):
    """A native transaction as ``transaction_history`` holds it (minor units)."""

    operation: str
    currency: str
    value: int
    settled: int
    cancelled: int
    released: int
    refunded: int
    operations: int  # settlements and cancellations listed


def transaction_figures(card: GiftCard) -> dict[str, TransactionFigures]:
    return {
        t.id: TransactionFigures(
            operation=t.operation,
            currency=card.currency,
            value=t.value,
            settled=t.settled,
            cancelled=t.cancelled,
            released=t.released,
            refunded=t.refunded,
            operations=len(t.settlements) + len(t.cancellations),
        )
        for t in card.transactions.values()
    }
