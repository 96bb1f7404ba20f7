"""The gift card aggregate: the rules of a native VTEX gift card, and nothing else.

One verb per VTEX operation (``issue``, ``credit``, ``debit``, ``settle``,
``cancel``), one event per fact (``Issued``, ``Credited``, ``Debited``,
``Settled``, ``Cancelled``, ``Voided``), one guard per rule. Guards live in the
command methods; an event's ``apply`` runs again on every replay and only applies
a fact that was already decided. Each event carries a stable stored name
(``ledger.domain.topics``), never the path of the module it is defined in.

Money is in integer minor units of the card's currency. Every transaction's
value is first *held*: a settlement captures part of what is held, a
cancellation first releases what is held and then refunds what was captured.
So for every transaction ``settled + released <= value`` and
``refunded <= settled``. A Debit lowers the available balance at once, a
Credit raises it at once; cancelling either undoes that part of it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import msgspec
from eventsourcing.domain import Aggregate

from ledger.domain import errors, topics
from ledger.domain.money import AMOUNT_MINOR_MAX, exponent_of, to_major

CREDIT = "Credit"
VOID_REQUEST_ID = "hold-expired"
DEBIT = "Debit"
OPERATIONS = (CREDIT, DEBIT)


class Client(msgspec.Struct, frozen=True):
    """Whoever a request names as the shopper; any of these may identify a card's owner."""

    id: str | None = None
    email: str | None = None
    document: str | None = None
    corporate_document: str | None = None

    def identifiers(self) -> set[str]:
        return {v for v in (self.id, self.email, self.document, self.corporate_document) if v}


# array_like: a long-lived card holds thousands of these, and its snapshot stores them as
# arrays rather than maps of field names; gc=False: they hold no cycles, so the collector
# need not walk them (both make loading a 10,000-transaction card several times faster).
class Operation(msgspec.Struct, array_like=True, gc=False):
    """A settlement or cancellation of a transaction (VTEX's ``{oid, value, date}``)."""

    oid: str
    value: int
    date: str
    request_id: str


class Transaction(msgspec.Struct, array_like=True, gc=False):
    id: str
    operation: str
    value: int
    description: str
    request_id: str
    date: str
    settled: int = 0
    released: int = 0
    refunded: int = 0
    # Tuples, not lists: a tuple of untracked structs is itself untracked by the garbage
    # collector, so a cache of long cards adds nothing to the collector's full passes (two lists
    # per transaction made a full pass over 100,000 cached transactions take ~90 ms).
    settlements: tuple[Operation, ...] = ()
    cancellations: tuple[Operation, ...] = ()
    voided_at: str | None = None  # when its expired hold was released by the ledger itself

    @property
    def held(self) -> int:
        return self.value - self.settled - self.released

    @property
    def cancelled(self) -> int:
        return self.released + self.refunded

    @property
    def cancellable(self) -> int:
        return self.held + self.settled - self.refunded

    @property
    def in_force(self) -> bool:
        """Still moves money: not wholly cancelled."""
        return self.cancelled < self.value


class IdempotencyRecord(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What a requestId was first used for, so that a retry gets the same answer."""

    fingerprint: str
    transaction_id: str
    oid: str | None = None


def _fingerprint(*parts: object) -> str:
    return "|".join(str(p) for p in parts)


class CardState:
    """Everything a card knows, field by field: what its events set, and so exactly what its
    snapshot carries (``ledger.domain.snapshot`` is derived from these annotations)."""

    relation_name: str
    caption: str
    profile_id: str
    currency: str
    emission_date: datetime
    expiring_date: datetime
    restricted_to_owner: bool
    multiple_credits: bool
    multiple_redemptions: bool
    code_tail: str
    issued_at: datetime
    balance: int
    transactions: dict[str, Transaction]
    request_ids: dict[str, IdempotencyRecord]


class GiftCard(Aggregate, CardState):
    TOPIC = topics.CARD

    # ---- events: one per fact, each applying only what was already decided ----

    class Event(Aggregate.Event):
        """A card event (defined here, so that the library need not derive one per event)."""

    class Issued(Event, Aggregate.Created):
        TOPIC = topics.ISSUED
        relation_name: str
        caption: str
        profile_id: str
        currency: str
        emission_date: str
        expiring_date: str
        restricted_to_owner: bool
        multiple_credits: bool
        multiple_redemptions: bool
        code_tail: str
        issued_at: str

        def apply(self, card: GiftCard) -> None:
            card.relation_name = self.relation_name
            card.caption = self.caption
            card.profile_id = self.profile_id
            card.currency = self.currency
            card.emission_date = datetime.fromisoformat(self.emission_date)
            card.expiring_date = datetime.fromisoformat(self.expiring_date)
            card.restricted_to_owner = self.restricted_to_owner
            card.multiple_credits = self.multiple_credits
            card.multiple_redemptions = self.multiple_redemptions
            card.code_tail = self.code_tail
            card.issued_at = datetime.fromisoformat(self.issued_at)
            card.balance = 0
            card.transactions = {}
            card.request_ids = {}

    Created = Issued  # the library's name for a card's first event: without it, it would derive one

    class Credited(Event):
        TOPIC = topics.CREDITED
        transaction_id: str
        value: int
        description: str
        request_id: str
        order_info: Any
        date: str

        def apply(self, card: GiftCard) -> None:
            card.record_transaction(CREDIT, self)
            card.balance += self.value

    class Debited(Event):
        TOPIC = topics.DEBITED
        transaction_id: str
        value: int
        description: str
        request_id: str
        order_info: Any
        date: str

        def apply(self, card: GiftCard) -> None:
            card.record_transaction(DEBIT, self)
            card.balance -= self.value

    class Settled(Event):
        TOPIC = topics.SETTLED
        transaction_id: str
        oid: str
        value: int
        request_id: str
        date: str

        def apply(self, card: GiftCard) -> None:
            transaction = card.transactions[self.transaction_id]
            transaction.settled += self.value
            transaction.settlements += (
                Operation(oid=self.oid, value=self.value, date=self.date, request_id=self.request_id),
            )
            card.request_ids[settlement_key(self.transaction_id, self.request_id)] = IdempotencyRecord(
                fingerprint=_fingerprint(self.value), transaction_id=self.transaction_id, oid=self.oid
            )

    class Cancelled(Event):
        TOPIC = topics.CANCELLED
        transaction_id: str
        oid: str
        value: int
        released: int
        refunded: int
        request_id: str
        date: str

        def apply(self, card: GiftCard) -> None:
            card.undo_part(self)
            card.request_ids[cancellation_key(self.transaction_id, self.request_id)] = IdempotencyRecord(
                fingerprint=_fingerprint(self.value), transaction_id=self.transaction_id, oid=self.oid
            )

    class Voided(Event):
        """An expired hold released by the ledger itself: a cancellation that only releases."""

        TOPIC = topics.VOIDED
        transaction_id: str
        oid: str
        value: int
        released: int
        refunded: int
        request_id: str
        date: str

        def apply(self, card: GiftCard) -> None:
            card.undo_part(self)
            card.transactions[self.transaction_id].voided_at = self.date

    # ---- issue -------------------------------------------------------------

    @classmethod
    def issue(
        cls,
        *,
        relation_name: str,
        caption: str,
        profile_id: str,
        currency: str,
        emission_date: datetime,
        expiring_date: datetime,
        restricted_to_owner: bool,
        multiple_credits: bool,
        multiple_redemptions: bool,
        code_tail: str,
        issued_at: datetime,
    ) -> GiftCard:
        exponent_of(currency)  # refuses an unknown currency
        cls.check_text("relationName", relation_name)
        cls.check_text("caption", caption)
        cls.check_text("profileId", profile_id)
        cls.check_validity_window(emission_date, expiring_date)
        return cls._create(
            cls.Issued,
            relation_name=relation_name,
            caption=caption,
            profile_id=profile_id,
            currency=currency,
            emission_date=emission_date.isoformat(),
            expiring_date=expiring_date.isoformat(),
            restricted_to_owner=restricted_to_owner,
            multiple_credits=multiple_credits,
            multiple_redemptions=multiple_redemptions,
            code_tail=code_tail,
            issued_at=issued_at.isoformat(),
        )

    # ---- transactions ------------------------------------------------------

    def credit(
        self,
        *,
        transaction_id: str,
        value: int,
        description: str,
        request_id: str,
        order_info: dict[str, Any] | None,
        now: datetime,
    ) -> Transaction:
        replayed = self.replayed_transaction(request_id, CREDIT, value)
        if replayed is not None:
            return replayed
        self.check_positive(value)
        self.check_not_expired(now)
        self.check_credit_allowed()
        self.check_balance_limit(value)
        self.trigger_event(
            self.Credited,
            transaction_id=transaction_id,
            value=value,
            description=description,
            request_id=request_id,
            order_info=order_info,
            date=now.isoformat(),
        )
        return self.transactions[transaction_id]

    def debit(
        self,
        *,
        transaction_id: str,
        value: int,
        description: str,
        request_id: str,
        order_info: dict[str, Any] | None,
        client: Client | None,
        now: datetime,
    ) -> Transaction:
        replayed = self.replayed_transaction(request_id, DEBIT, value)
        if replayed is not None:
            return replayed
        self.check_positive(value)
        self.check_within_validity(now)
        self.check_owner(client)
        self.check_redemption_allowed()
        self.check_sufficient_funds(value)
        self.trigger_event(
            self.Debited,
            transaction_id=transaction_id,
            value=value,
            description=description,
            request_id=request_id,
            order_info=order_info,
            date=now.isoformat(),
        )
        return self.transactions[transaction_id]

    def record_transaction(self, operation: str, event: GiftCard.Credited | GiftCard.Debited) -> None:
        """What a Credit and a Debit both record: the transaction, and its requestId for a retry."""
        self.transactions[event.transaction_id] = Transaction(
            id=event.transaction_id,
            operation=operation,
            value=event.value,
            description=event.description,
            request_id=event.request_id,
            date=event.date,
        )  # orderInfo stays in the event only: no rule reads it, and a long card's state stays small
        self.request_ids[transaction_key(event.request_id)] = IdempotencyRecord(
            fingerprint=_fingerprint(operation, event.value), transaction_id=event.transaction_id
        )

    # ---- settlements and cancellations --------------------------------------

    def settle(self, *, transaction_id: str, oid: str, value: int, request_id: str, now: datetime) -> Operation:
        transaction = self.transaction(transaction_id)
        replayed = self.replayed_operation(
            settlement_key(transaction_id, request_id), request_id, value, transaction.settlements
        )
        if replayed is not None:
            return replayed
        self.check_positive(value)
        self.check_hold_not_voided(transaction)
        self.check_settlement_within_held(transaction, value)
        self.trigger_event(
            self.Settled,
            transaction_id=transaction_id,
            oid=oid,
            value=value,
            request_id=request_id,
            date=now.isoformat(),
        )
        return transaction.settlements[-1]

    def cancel(self, *, transaction_id: str, oid: str, value: int, request_id: str, now: datetime) -> Operation:
        transaction = self.transaction(transaction_id)
        replayed = self.replayed_operation(
            cancellation_key(transaction_id, request_id), request_id, value, transaction.cancellations
        )
        if replayed is not None:
            return replayed
        self.check_positive(value)
        self.check_cancellation_within_cancellable(transaction, value)
        if transaction.operation == CREDIT:
            self.check_sufficient_funds(value)
        else:
            self.check_balance_limit(value)
        released = min(value, transaction.held)
        self.trigger_event(
            self.Cancelled,
            transaction_id=transaction_id,
            oid=oid,
            value=value,
            released=released,
            refunded=value - released,
            request_id=request_id,
            date=now.isoformat(),
        )
        return transaction.cancellations[-1]

    # ---- hold expiry -----------------------------------------------------------

    def void_expired_hold(
        self, *, transaction_id: str, oid: str, hold_ttl: timedelta, now: datetime
    ) -> Operation | None:
        """Releases what an authorization still holds once ``hold_ttl`` has passed; None when there
        is nothing to void (not a Debit, nothing held, already voided, or not yet expired).

        The void is listed among the transaction's cancellations, so a hub that sums them before
        cancelling (as VTEX's does) never asks to release what is already released.
        """
        transaction = self.transaction(transaction_id)
        if transaction.operation != DEBIT or transaction.held == 0 or transaction.voided_at is not None:
            return None
        if now < datetime.fromisoformat(transaction.date) + hold_ttl:
            return None
        self.trigger_event(
            self.Voided,
            transaction_id=transaction_id,
            oid=oid,
            value=transaction.held,
            released=transaction.held,
            refunded=0,
            request_id=VOID_REQUEST_ID,
            date=now.isoformat(),
        )
        return transaction.cancellations[-1]

    def undo_part(self, event: GiftCard.Cancelled | GiftCard.Voided) -> None:
        """What a cancellation and a void both do: release, refund, list it, move the balance back."""
        transaction = self.transactions[event.transaction_id]
        transaction.released += event.released
        transaction.refunded += event.refunded
        transaction.cancellations += (
            Operation(oid=event.oid, value=event.value, date=event.date, request_id=event.request_id),
        )
        self.balance += event.value if transaction.operation == DEBIT else -event.value

    # ---- queries -----------------------------------------------------------

    def transaction(self, transaction_id: str) -> Transaction:
        try:
            return self.transactions[transaction_id]
        except KeyError:
            raise errors.TransactionNotFound(f"transaction {transaction_id!r} not found on card {self.id}") from None

    def is_expired(self, now: datetime) -> bool:
        return now > self.expiring_date

    def is_usable(self, now: datetime) -> bool:
        """What ``_search`` offers a shopper: valid now and with money on it."""
        return self.balance > 0 and self.emission_date <= now <= self.expiring_date

    def is_owned_by(self, client: Client) -> bool:
        return self.profile_id in client.identifiers()

    # ---- idempotency -------------------------------------------------------

    def replayed_transaction(self, request_id: str, operation: str, value: int) -> Transaction | None:
        self.check_text("requestId", request_id)
        record = self.request_ids.get(transaction_key(request_id))
        if record is None:
            return None
        self.check_same_request(record, _fingerprint(operation, value), request_id)
        return self.transactions[record.transaction_id]

    def replayed_operation(
        self, key: str, request_id: str, value: int, operations: tuple[Operation, ...]
    ) -> Operation | None:
        self.check_text("requestId", request_id)
        record = self.request_ids.get(key)
        if record is None:
            return None
        self.check_same_request(record, _fingerprint(value), request_id)
        return next(op for op in operations if op.oid == record.oid)

    # ---- guards: one per rule ------------------------------------------------

    @staticmethod
    def check_text(field: str, value: str) -> None:
        if not value or not value.strip():
            raise errors.InvalidRequest(f"{field} must be a non-empty string")

    @staticmethod
    def check_validity_window(emission_date: datetime, expiring_date: datetime) -> None:
        if emission_date.tzinfo is None or expiring_date.tzinfo is None:
            raise errors.InvalidCard("emissionDate and expiringDate must carry a time zone")
        if expiring_date <= emission_date:
            raise errors.InvalidCard("expiringDate must be later than emissionDate")

    def check_positive(self, value: int) -> None:
        if value <= 0:
            raise errors.InvalidAmount(f"value must be greater than zero, got {self.amount(value)}")
        if value > AMOUNT_MINOR_MAX:
            raise errors.InvalidAmount("value exceeds the largest amount a card may hold")

    @staticmethod
    def check_same_request(record: IdempotencyRecord, fingerprint: str, request_id: str) -> None:
        if record.fingerprint != fingerprint:
            raise errors.RequestIdReused(
                f"requestId {request_id!r} was already used on this card for a different request"
            )

    def check_not_expired(self, now: datetime) -> None:
        if self.is_expired(now):
            raise errors.CardExpired(f"card {self.id} expired at {self.expiring_date.isoformat()}")

    def check_within_validity(self, now: datetime) -> None:
        self.check_not_expired(now)
        if now < self.emission_date:
            raise errors.CardNotYetValid(f"card {self.id} is valid from {self.emission_date.isoformat()}")

    def check_credit_allowed(self) -> None:
        if not self.multiple_credits and any(t.operation == CREDIT and t.in_force for t in self.transactions.values()):
            raise errors.CreditNotAllowed(f"card {self.id} does not accept multiple credits")

    def check_redemption_allowed(self) -> None:
        if not self.multiple_redemptions and any(
            t.operation == DEBIT and t.in_force for t in self.transactions.values()
        ):
            raise errors.RedemptionNotAllowed(f"card {self.id} does not allow multiple redemptions")

    def check_owner(self, client: Client | None) -> None:
        if self.restricted_to_owner and client is not None and client.identifiers() and not self.is_owned_by(client):
            raise errors.NotOwner(f"card {self.id} is restricted to its owner")

    def check_sufficient_funds(self, value: int) -> None:
        if value > self.balance:
            raise errors.InsufficientFunds(
                f"card {self.id} has {self.amount(self.balance)} available, {self.amount(value)} requested"
            )

    def check_balance_limit(self, value: int) -> None:
        if self.balance + value > AMOUNT_MINOR_MAX:
            raise errors.BalanceLimitExceeded(f"card {self.id} cannot hold more than {self.amount(AMOUNT_MINOR_MAX)}")

    @staticmethod
    def check_hold_not_voided(transaction: Transaction) -> None:
        if transaction.voided_at is not None:
            raise errors.HoldVoided(
                f"transaction {transaction.id}'s authorization expired and was voided at {transaction.voided_at}; "
                "nothing is left to settle"
            )

    def check_settlement_within_held(self, transaction: Transaction, value: int) -> None:
        if value > transaction.held:
            raise errors.OverSettlement(
                f"transaction {transaction.id} holds {self.amount(transaction.held)}, "
                f"cannot settle {self.amount(value)}",
                left=to_major(transaction.held, self.currency),
                currency=self.currency,
            )

    def check_cancellation_within_cancellable(self, transaction: Transaction, value: int) -> None:
        if value > transaction.cancellable:
            raise errors.OverCancellation(
                f"transaction {transaction.id} has {self.amount(transaction.cancellable)} left to cancel, "
                f"cannot cancel {self.amount(value)}",
                left=to_major(transaction.cancellable, self.currency),
                currency=self.currency,
            )

    # ---- wording -----------------------------------------------------------

    def amount(self, minor: int) -> str:
        """An amount as callers write it: major units and the currency (``12.50 USD``), never minor units."""
        return f"{to_major(minor, self.currency)} {self.currency}"


def transaction_key(request_id: str) -> str:
    return f"transaction:{request_id}"


def settlement_key(transaction_id: str, request_id: str) -> str:
    return f"settlement:{transaction_id}:{request_id}"


def cancellation_key(transaction_id: str, request_id: str) -> str:
    return f"cancellation:{transaction_id}:{request_id}"


def void_key(transaction_id: str) -> str:
    return f"void:{transaction_id}"


topics.register_legacy_topics()
