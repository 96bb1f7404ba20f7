"""Subscriptions, their checkpoints and dead letters: all of the webhooks' SQL is in this file.

A subscription's checkpoint is its place in each source's commit order (ledger.eventstore.commit_order),
moved with a compare-and-set on the place it started from, so a replay (or a removal) that
lands while a batch is being delivered makes the batch stop instead of overwriting it.
Delivering holds a *session* advisory lock on the subscription, not a transaction held open
across HTTP calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import asyncpg

from ledger.domain.errors import InvalidRequest, NotFound
from ledger.eventstore.commit_order import Checkpoint
from ledger.eventstore.store import EventStore, RecordedEvent
from ledger.postgres.rows import from_row
from ledger.postgres.tenancy import ENTER_SCOPE

LOCK_CLASS = 0x77686B73  # "whks": advisory lock namespace; the second key is hashtext(subscription id)


class SubscriptionNotFound(NotFound):
    code = "webhook_not_found"


class TooManySubscriptions(InvalidRequest):
    code = "too_many_webhooks"


class NothingToReplay(InvalidRequest):
    code = "nothing_to_replay"


class SubscriptionMoved(Exception):
    """The subscription was replayed or removed while this batch was delivered: the batch stops."""


@dataclass(frozen=True)
class Subscription:
    id: str
    url: str
    event_types: tuple[str, ...] | None  # None: every type
    description: str | None
    sealed_secret: str = field(repr=False)  # ciphertext; still kept out of every repr and log line
    checkpoint: Checkpoint = Checkpoint()
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    delivered: int = 0
    last_delivered_at: datetime | None = None
    created_at: datetime | None = None
    dead_letters: int = 0
    lag_events: int = 0

    def wants(self, public_type: str) -> bool:
        return self.event_types is None or public_type in self.event_types


class Due(NamedTuple):
    """A subscription the poll found with something to do."""

    tenant_id: str
    retry: bool  # an operator asked to retry some of its dead letters


@dataclass(frozen=True)
class DeadLetter:
    subscription_id: str
    position: int
    event_type: str
    subject_id: str
    body: bytes = field(repr=False)
    attempts: int
    last_error: str
    dead_at: datetime
    retry_requested: bool


_SUBSCRIPTION_COLUMNS = """
    s.id, s.url, s.event_types, s.description, s.secret, s.checkpoint::text as checkpoint, s.attempts,
    s.next_attempt_at, s.last_error, s.delivered, s.last_delivered_at, s.created_at
"""

# A new subscription starts at the head of every source ($6): everything that commits from now
# on, including transactions already running (their seq comes after the head), is delivered to it.
_CREATE = f"""
insert into webhook_subscriptions as s (id, url, event_types, description, secret, checkpoint)
select $1, $2, $3, $4, $5, $6::jsonb
where (select count(*) from webhook_subscriptions) < $7
returning {_SUBSCRIPTION_COLUMNS}
"""

_LIST = f"""
select {_SUBSCRIPTION_COLUMNS},
       (select count(*) from webhook_dead_letters d where d.subscription_id = s.id) as dead_letters
from webhook_subscriptions s
where $1::text is null or s.id = $1
order by s.created_at, s.id
"""

_REMOVE = "delete from webhook_subscriptions where id = $1 returning id"

_SECRET_FOR_UPDATE = "select secret from webhook_subscriptions where id = $1 for update"
_SET_SECRET = "update webhook_subscriptions set secret = $2 where id = $1"

# Replay from position P: in each source, the checkpoint goes just before its first event, in
# commit order, of those at P or later (a source with none stays at its head). Every event from
# P on is then delivered again (and the few older ones that committed after it: receivers dedupe
# by id). The head's failed attempts are forgotten.
_REPLAY_START = """
select source, min(seq) - 1 as seq from events where position >= $1 group by source
"""

_MOVE = """
update webhook_subscriptions
set checkpoint = $2::jsonb, attempts = 0, next_attempt_at = null, last_error = null
where id = $1
returning id
"""

# Subscriptions not waiting out a backoff: their places, and whether an operator asked to retry
# dead letters (the deliverer compares the places with the head).
_NOT_WAITING = """
select s.id, s.tenant_id, s.checkpoint::text as checkpoint,
       exists (select 1 from webhook_dead_letters d where d.subscription_id = s.id and d.retry_requested) as retry
from webhook_subscriptions s
where s.next_attempt_at is null or s.next_attempt_at <= clock_timestamp()
order by s.id
"""

_UNLOCK = "select pg_advisory_unlock($1, hashtext($2))"
# The store's scope ($1, see ledger.postgres.tenancy), then the previous subscription's lock ($3; none
# when null: the functions are strict) released and the next one's ($4) tried.
_HAND_OVER = f"""
select {ENTER_SCOPE}, pg_advisory_unlock($2, hashtext($3)) as released, pg_try_advisory_lock($2, hashtext($4)) as taken
"""

_LOAD_DUE = f"""
select {_SUBSCRIPTION_COLUMNS} from webhook_subscriptions s
where s.id = $1 and (s.next_attempt_at is null or s.next_attempt_at <= clock_timestamp())
"""


def _count_delivered(n: str) -> str:
    """The SET items that add ``n`` (a parameter) events to a subscription's deliveries."""
    return f"delivered = delivered + {n}, last_delivered_at = case when {n} > 0 then clock_timestamp() else last_delivered_at end"


_ADVANCE = f"""
update webhook_subscriptions
set checkpoint = $3::jsonb, attempts = 0, next_attempt_at = null, last_error = null, {_count_delivered("$4")}
where id = $1 and checkpoint = $2::jsonb
"""

# A failure also moves the checkpoint up to just before the failing event (past the filtered-out
# and delivered events before it), so that ``attempts`` always counts the failures of the event after it.
_FAILED = f"""
update webhook_subscriptions
set checkpoint = $3::jsonb, attempts = $4,
    next_attempt_at = clock_timestamp() + make_interval(secs => $5), last_error = $6, {_count_delivered("$7")}
where id = $1 and checkpoint = $2::jsonb
"""

_INSERT_DEAD_LETTER = """
insert into webhook_dead_letters (subscription_id, position, event_type, subject_id, body, attempts, last_error)
values ($1, $2, $3, $4, $5, $6, $7)
on conflict (subscription_id, position) do update
    set body = excluded.body, attempts = webhook_dead_letters.attempts + excluded.attempts,
        last_error = excluded.last_error, dead_at = clock_timestamp(), retry_requested = false
"""

_DEAD_LETTERS = """
select subscription_id, position, event_type, subject_id, body, attempts, last_error, dead_at, retry_requested,
       count(*) over () as total
from webhook_dead_letters
where $1::text is null or subscription_id = $1
order by subscription_id, position
offset $2 limit $3
"""

_REQUEST_RETRY = """
update webhook_dead_letters set retry_requested = true
where ($1::text is null or subscription_id = $1) and not retry_requested
"""

_RETRIES_DUE = """
select subscription_id, position, event_type, subject_id, body, attempts, last_error, dead_at, retry_requested
from webhook_dead_letters where subscription_id = $1 and retry_requested
order by position limit $2
"""

_REDELIVERED = "delete from webhook_dead_letters where subscription_id = $1 and position = $2"

_REDELIVERY_FAILED = """
update webhook_dead_letters
set attempts = attempts + 1, last_error = $3, retry_requested = false, dead_at = clock_timestamp()
where subscription_id = $1 and position = $2
"""

# A card's currency is on its issue event only (version 1); amounts in later events need it.
_CARD_CURRENCIES = """
select stream_id, data->>'currency' as currency from events
where stream_id = any($1::text[]) and version = 1 and type = any($2::text[])
"""


# ---- administration (CLI and HTTP) ---------------------------------------------------------


async def create(
    pool: asyncpg.Pool,
    *,
    id: str,
    url: str,
    event_types: Sequence[str] | None,
    description: str | None,
    sealed_secret: str,
    subscriptions_max: int,
) -> Subscription:
    head = await EventStore(pool).head()
    row = await pool.fetchrow(
        _CREATE,
        id,
        url,
        None if event_types is None else list(event_types),
        description,
        sealed_secret,
        head.to_json(),
        subscriptions_max,
    )
    if row is None:
        raise TooManySubscriptions(f"at most {subscriptions_max} webhook subscriptions may exist; remove one first")
    return _subscription(row)


async def list_subscriptions(pool: asyncpg.Pool, subscription_id: str | None = None) -> list[Subscription]:
    rows = await pool.fetch(_LIST, subscription_id)
    head = await EventStore(pool).head()
    return [_subscription(row, head) for row in rows]


async def get(pool: asyncpg.Pool, subscription_id: str) -> Subscription:
    found = await list_subscriptions(pool, subscription_id)
    if not found:
        raise SubscriptionNotFound(f"webhook subscription {subscription_id!r} not found")
    return found[0]


async def remove(pool: asyncpg.Pool, subscription_id: str) -> None:
    if await pool.fetchval(_REMOVE, subscription_id) is None:
        raise SubscriptionNotFound(f"webhook subscription {subscription_id!r} not found")


async def sealed_secret_for_update(connection: asyncpg.Connection, subscription_id: str) -> str:
    """The sealed secret, its row locked until the transaction ends (two rotations queue up)."""
    sealed = await connection.fetchval(_SECRET_FOR_UPDATE, subscription_id)
    if sealed is None:
        raise SubscriptionNotFound(f"webhook subscription {subscription_id!r} not found")
    return sealed


async def set_sealed_secret(connection: asyncpg.Connection, subscription_id: str, sealed: str) -> None:
    await connection.execute(_SET_SECRET, subscription_id, sealed)


async def replay(pool: asyncpg.Pool, subscription_id: str, from_position: int) -> Subscription:
    """Moves the checkpoint back (or forward) so delivery starts again at ``from_position``."""
    async with pool.acquire() as connection, connection.transaction():
        starts = await connection.fetch(_REPLAY_START, from_position)
        if not starts:
            raise NothingToReplay(f"there is no event at position {from_position} or later")
        head = await EventStore(connection).head()
        start = Checkpoint.of(head.as_dict() | {row["source"]: row["seq"] for row in starts})
        if await connection.fetchval(_MOVE, subscription_id, start.to_json()) is None:
            raise SubscriptionNotFound(f"webhook subscription {subscription_id!r} not found")
    return await get(pool, subscription_id)


async def dead_letters(
    pool: asyncpg.Pool, subscription_id: str | None, offset: int, limit: int
) -> tuple[list[DeadLetter], int]:
    """A page of dead letters, oldest event first, and how many there are in all."""
    rows = await pool.fetch(_DEAD_LETTERS, subscription_id, offset, limit)
    total = rows[0]["total"] if rows else 0
    return [_dead_letter(row) for row in rows], total


async def request_retry(pool: asyncpg.Pool, subscription_id: str | None) -> int:
    """Marks dead letters for one more attempt by the deliverers; returns how many were marked."""
    status = await pool.execute(_REQUEST_RETRY, subscription_id)
    return int(status.split()[-1])


# ---- delivery ------------------------------------------------------------------------------


async def due_subscriptions(pool: asyncpg.Pool) -> tuple[dict[str, Due], Checkpoint]:
    """Every subscription with something to do now, each with its store: events after its
    checkpoint, or dead letters an operator asked to retry; and not waiting out a backoff. With
    the head they were compared to, read in the caller's scope (every store's, for a deliverer)
    before any of their batches. All of them, not the first few by id: the deliverer gives its
    slots to the ones that waited longest, which a cut by id would starve."""
    rows = await pool.fetch(_NOT_WAITING)
    head = await EventStore(pool).head()
    due = [row for row in rows if row["retry"] or Checkpoint.from_json(row["checkpoint"]).behind(head)]
    return {row["id"]: Due(row["tenant_id"], row["retry"]) for row in due}, head


async def tenant_of(pool: asyncpg.Pool, subscription_id: str) -> str | None:
    return await pool.fetchval("select tenant_id from webhook_subscriptions where id = $1", subscription_id)


class SlotLock:
    """The one subscription lock a deliverer's slot holds on its connection (a session-level
    advisory lock), handed from each subscription to the next in one statement that also enters the
    next one's store: the slot stored the previous one's checkpoint before, so whoever locks that one
    next loads it after. A batch thus pays one round trip for what took three (the store's scope, the
    unlock, the lock), which a deployment of many stores pays at each store's batch.

    The lock never outlives the slot on a pooled connection: the webhook pools skip asyncpg's full
    release reset (with it, two round trips more: the reset, then the scope set again), so when the
    lock cannot be released for sure (the connection broke, or the task was cancelled in the middle
    of a statement) the connection is closed, which releases it."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.held: str | None = None
        self._uncertain = False  # a statement that would change the lock did not answer

    @property
    def usable(self) -> bool:
        """False once the connection broke, or holds a lock this slot cannot account for."""
        return not self._uncertain and not self.connection.is_closed()

    async def take(self, subscription_id: str, tenant_id: str) -> bool:
        """Releases the lock held (if any) and tries ``subscription_id``'s, in its store's scope;
        False: another deliverer holds it."""
        if self._uncertain:
            raise ConnectionError("this slot's connection holds a lock it cannot account for")
        previous, self.held = self.held, None
        self._uncertain = True
        row = await self.connection.fetchrow_entering_scope(
            tenant_id, _HAND_OVER, LOCK_CLASS, previous, subscription_id
        )
        taken: bool = row["taken"]
        if previous is not None and not row["released"]:
            return False  # stays uncertain: release() closes the connection
        self._uncertain = False
        self.held = subscription_id if taken else None
        return taken

    async def release(self) -> None:
        """At the slot's end: the lock held goes, or the connection does."""
        released = False  # until the server says so
        try:
            if not self._uncertain:
                released = self.held is None or await self.connection.fetchval(_UNLOCK, LOCK_CLASS, self.held)
        except Exception:  # the connection broke: closed below
            pass
        finally:
            if not released:  # also when cancelled again while unlocking (a deliverer told to stop)
                self.connection.terminate()
            self.held = None


async def load_due(connection: asyncpg.Connection, subscription_id: str) -> Subscription | None:
    """The subscription as it is now, or None when it was removed or waits out a backoff."""
    row = await connection.fetchrow(_LOAD_DUE, subscription_id)
    return None if row is None else _subscription(row)


async def advance(
    connection: asyncpg.Connection, subscription_id: str, after: Checkpoint, to: Checkpoint, delivered: int
) -> None:
    status = await connection.execute(_ADVANCE, subscription_id, after.to_json(), to.to_json(), delivered)
    _check_moved(status, subscription_id, after)


async def record_failure(
    connection: asyncpg.Connection,
    subscription_id: str,
    after: Checkpoint,
    to: Checkpoint,
    delivered: int,
    attempts: int,
    retry_in_s: float,
    error: str,
) -> None:
    """Moves the checkpoint from ``after`` up to the failing event (``to``: past the ``delivered``
    events of the batch before it) and schedules the retry."""
    status = await connection.execute(
        _FAILED, subscription_id, after.to_json(), to.to_json(), attempts, retry_in_s, error, delivered
    )
    _check_moved(status, subscription_id, after)


async def dead_letter(
    connection: asyncpg.Connection,
    subscription_id: str,
    after: Checkpoint,
    to: Checkpoint,
    delivered: int,
    event: RecordedEvent,
    public_type: str,
    body: bytes,
    attempts: int,
    error: str,
) -> None:
    """Sets the event aside and moves the checkpoint from ``after`` past it (``to`` is just before
    it, past the ``delivered`` events of the batch), in one transaction."""
    async with connection.transaction():
        await connection.execute(
            _INSERT_DEAD_LETTER,
            subscription_id,
            event.position,
            public_type,
            event.stream_id,
            body.decode(),
            attempts,
            error,
        )
        await advance(connection, subscription_id, after, to.past([event]), delivered)


async def retries_due(connection: asyncpg.Connection, subscription_id: str, limit: int) -> list[DeadLetter]:
    return [_dead_letter(row) for row in await connection.fetch(_RETRIES_DUE, subscription_id, limit)]


async def redelivered(connection: asyncpg.Connection, letter: DeadLetter) -> None:
    await connection.execute(_REDELIVERED, letter.subscription_id, letter.position)


async def redelivery_failed(connection: asyncpg.Connection, letter: DeadLetter, error: str) -> None:
    await connection.execute(_REDELIVERY_FAILED, letter.subscription_id, letter.position, error)


async def card_currencies(
    connection: asyncpg.Connection, card_ids: Sequence[str], issued_types: Sequence[str]
) -> dict[str, str]:
    """Each card's currency, read from its issue (stored under any of ``issued_types``)."""
    rows = await connection.fetch(_CARD_CURRENCIES, list(card_ids), list(issued_types))
    return {row["stream_id"]: row["currency"] for row in rows if row["currency"]}


# ---- rows ----------------------------------------------------------------------------------


def _check_moved(status: str, subscription_id: str, after: Checkpoint) -> None:
    if status != "UPDATE 1":
        raise SubscriptionMoved(f"webhook subscription {subscription_id} was replayed or removed after {after}")


def _subscription(row: asyncpg.Record, head: Checkpoint | None = None) -> Subscription:
    checkpoint = Checkpoint.from_json(row["checkpoint"])
    return from_row(
        Subscription,
        row,
        event_types=None if row["event_types"] is None else tuple(row["event_types"]),
        sealed_secret=row["secret"],
        checkpoint=checkpoint,
        dead_letters=row.get("dead_letters", 0),  # counted only when subscriptions are listed
        lag_events=0 if head is None else checkpoint.behind(head),
    )


def _dead_letter(row: asyncpg.Record) -> DeadLetter:
    return from_row(DeadLetter, row, body=row["body"].encode())
