"""Concurrent Debits that a client retries with the same requestId until answered, and an audit
of what the events table says afterwards.

A client that loses its answer (the hub died, the database restarted) cannot know whether the
Debit was applied, so it sends the very same request again: the ledger's idempotency must turn
that into exactly one event. The audit checks it from the database, not from the service.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import aiohttp
import asyncpg
from eventsourcing.utils import get_topic

from ledger.domain.giftcard import GiftCard
from ledger.eventstore.store import ChainBroken, EventStore, verify_chain
from tests.hub_process import Answer, NativeClient

DEBITED = get_topic(GiftCard.Debited)
MINOR_PER_MAJOR = 100  # the scenarios use USD cards


@dataclass(frozen=True)
class RetryPolicy:
    attempts_max: int = 400
    attempt_timeout_s: float = 20.0  # longer than the service's 15 s statement timeout: past it, a hang
    backoff_s: float = 0.02
    backoff_max_s: float = 0.5


@dataclass
class Debit:
    """One client request and everything that happened to it, attempt by attempt."""

    card_id: str
    request_id: str
    value: Decimal
    target: int = 0  # which hub (index into the clients) this request goes to
    status: int | None = None  # the final answer's status; None while unanswered
    code: str | None = None  # the final answer's error code, if any
    transaction_id: str | None = None
    attempts: int = 0
    cut_off: int = 0  # attempts that got no answer at all: connection refused or reset
    unavailable: int = 0  # attempts answered 503
    timeouts: int = 0  # attempts still unanswered after the attempt timeout: hangs
    unavailable_answers: list[Answer] = field(default_factory=list)
    server_errors: list[Answer] = field(default_factory=list)  # any 5xx other than 503

    @property
    def acknowledged(self) -> bool:
        return self.status == 200

    @property
    def minor(self) -> int:
        return int(self.value * MINOR_PER_MAJOR)


def plan_debits(card_ids: Sequence[str], count: int, values: Sequence[Decimal], *, targets: int = 1) -> list[Debit]:
    """``count`` Debits spread round-robin over the cards (and over ``targets`` hubs), unique requestIds."""
    run = uuid.uuid4().hex[:8]
    return [
        Debit(
            card_id=card_ids[i % len(card_ids)],
            request_id=f"{run}-{i}",
            value=values[i % len(values)],
            target=i % targets,
        )
        for i in range(count)
    ]


def acknowledged_count(debits: Sequence[Debit]) -> int:
    return sum(d.acknowledged for d in debits)


async def send_until_answered(client: NativeClient, debit: Debit, policy: RetryPolicy, deadline: float) -> None:
    """Sends the same request until a final answer (anything but a 503 or no answer), bounded in
    attempts and time. A 5xx other than 503 is final too: it is the bug the scenarios look for."""
    loop = asyncio.get_running_loop()
    backoff = policy.backoff_s
    for _ in range(policy.attempts_max):
        if loop.time() > deadline:
            return
        debit.attempts += 1
        try:
            answer = await client.transaction(
                debit.card_id, "Debit", debit.value, debit.request_id, timeout_s=policy.attempt_timeout_s
            )
        except TimeoutError:  # checked first: some aiohttp timeouts are also ClientErrors
            debit.timeouts += 1
        except aiohttp.ClientError:
            debit.cut_off += 1
        else:
            if answer.status != 503:
                record_final(debit, answer)
                return
            debit.unavailable += 1
            debit.unavailable_answers.append(answer)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, policy.backoff_max_s)


def record_final(debit: Debit, answer: Answer) -> None:
    debit.status = answer.status
    if answer.status == 200:
        debit.transaction_id = answer.body["id"]
    elif isinstance(answer.body, dict):
        debit.code = answer.body.get("error", {}).get("code")
    if answer.status >= 500:
        debit.server_errors.append(answer)


async def send_all(
    clients: Sequence[NativeClient], debits: Sequence[Debit], *, concurrency: int, policy: RetryPolicy, deadline: float
) -> None:
    """Every Debit at once, ``concurrency`` in flight; the semaphore (not the connection pool) does
    the queueing, so an attempt's timeout only runs while it is really on the wire."""
    gate = asyncio.Semaphore(concurrency)

    async def one(debit: Debit) -> None:
        async with gate:
            await send_until_answered(clients[debit.target], debit, policy, deadline)

    async with asyncio.TaskGroup() as group:
        for debit in debits:
            group.create_task(one(debit))


async def until_acknowledged(debits: Sequence[Debit], count: int, deadline: float, poll_s: float = 0.005) -> None:
    loop = asyncio.get_running_loop()
    while acknowledged_count(debits) < count:
        if loop.time() > deadline:
            raise TimeoutError(f"only {acknowledged_count(debits)} of {count} Debits acknowledged in time")
        await asyncio.sleep(poll_s)


# ---- the audit, from the database ------------------------------------------------------------


@dataclass
class Audit:
    sent: int
    acknowledged: int
    events: int
    lost: list[str]  # acknowledged, but no event carries the acknowledged transaction
    duplicated: list[str]  # requestIds with more than one Debited event on their card
    unexpected: list[str]  # Debited events no acknowledged request accounts for
    balance_from_events: dict[str, int]  # credit minus every Debited value, per card, minor units

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)


async def debited_events(pool: asyncpg.Pool, card_ids: Sequence[str]) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        select stream_id, data->>'request_id' as request_id, data->>'transaction_id' as transaction_id,
               (data->>'value')::bigint as value
        from events where type = $1 and stream_id = any($2::text[])
        """,
        DEBITED,
        list(card_ids),
    )


async def audit(pool: asyncpg.Pool, debits: Sequence[Debit], credit_minor: dict[str, int]) -> Audit:
    """What the events table holds against what the clients were told."""
    rows = await debited_events(pool, list(credit_minor))
    per_request = Counter((row["stream_id"], row["request_id"]) for row in rows)
    event_of = {(row["stream_id"], row["request_id"]): row["transaction_id"] for row in rows}
    acknowledged = {(d.card_id, d.request_id): d for d in debits if d.acknowledged}
    balance = dict(credit_minor)
    for row in rows:
        balance[row["stream_id"]] -= row["value"]
    return Audit(
        sent=len(debits),
        acknowledged=len(acknowledged),
        events=len(rows),
        lost=[d.request_id for key, d in acknowledged.items() if event_of.get(key) != d.transaction_id],
        duplicated=[request_id for (_, request_id), n in per_request.items() if n > 1],
        unexpected=[request_id for (card_id, request_id) in per_request if (card_id, request_id) not in acknowledged],
        balance_from_events=balance,
    )


async def broken_chains(pool: asyncpg.Pool, card_ids: Sequence[str]) -> list[str]:
    """Cards whose stream has a version gap or a hash that does not follow (see ledger.eventstore.store)."""
    store = EventStore(pool)
    broken = []
    for card_id in card_ids:
        try:
            verify_chain(await store.read_stream(card_id))
        except ChainBroken as e:  # named in the report rather than failing on the first
            broken.append(f"{card_id}: {e}")
    return broken


def expected_balances(debits: Sequence[Debit], credit_minor: dict[str, int]) -> dict[str, int]:
    """What each card must hold if every acknowledged Debit was applied once and nothing else was."""
    spent: dict[str, int] = defaultdict(int)
    for debit in debits:
        if debit.acknowledged:
            spent[debit.card_id] += debit.minor
    return {card_id: credit - spent[card_id] for card_id, credit in credit_minor.items()}
