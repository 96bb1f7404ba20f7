"""Ledgers for the auditor and finance tests: a small known history, forwarded calls, a large
ledger written fast, tampering as a database owner would, and the finance CLI as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from ledger.application.commands import Ledger
from ledger.eventstore.codec import canonical_json, new_mapper
from ledger.eventstore.store import EventStore, NewEvent, chain_hash
from ledger.postgres.distribution import is_distributed
from projections import read_models
from projections.runner import ProjectionRunner
from tests.cards import issue, issued_aggregate, load_and_order
from tests.conftest import Clock
from tests.subprocesses import output_within

NATIVE = "VtexGiftCard"
CLI_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class History:
    usd: str  # issued 15 Jan: +100 (credit), -30.50 (debit), settle 20, cancel 15 of the debit, cancel 5 of the credit
    jpy: str  # issued 16 Jan: +500
    bhd: str  # issued 16 Jan: +12.345, -0.005
    debit: str  # the USD card's debit
    credit: str  # the USD card's credit


async def write_history(ledger: Ledger, clock: Clock) -> History:
    """Three cards in three currencies over three days (15, 16, 17 January 2026, by the ledger's clock)."""
    usd = await _issue(ledger, "USD")
    credit, debit = await load_and_order(ledger, usd, "o-1")
    clock.advance(timedelta(days=1))
    await ledger.settle(usd, debit.id, value=Decimal(20), request_id="s1")
    jpy = await _issue(ledger, "JPY")
    await ledger.create_transaction(jpy, operation="Credit", value=Decimal(500), description="load", request_id="l")
    bhd = await _issue(ledger, "BHD")
    await ledger.create_transaction(bhd, operation="Credit", value=Decimal("12.345"), description="l", request_id="l")
    await ledger.create_transaction(bhd, operation="Debit", value=Decimal("0.005"), description="d", request_id="d")
    clock.advance(timedelta(days=1))
    await ledger.cancel(usd, debit.id, value=Decimal(15), request_id="c1")
    await ledger.cancel(usd, credit.id, value=Decimal(5), request_id="c2")
    return History(usd, jpy, bhd, debit.id, credit.id)


async def _issue(ledger: Ledger, currency: str) -> str:
    fields = {"caption": "c", "profile_id": "ana@example.com", "relation_name": f"audit-{uuid.uuid4().hex}"}
    return str((await issue(ledger, currency=currency, **fields)).card.id)


async def forward(
    store: EventStore,
    operation: str,
    value: str | None,
    *,
    provider: str = "Acme",
    card_id: str | None = "ext-card-1",
    transaction_id: str | None = None,
    request_id: str | None = None,
    outcome: str = "ok",
) -> str:
    """A ProviderCallForwarded event as hub/providers/external.py records it; returns its stream."""
    stream = f"forwarded-{uuid.uuid4()}"
    data = {
        "operation": operation,
        "providerId": provider,
        "cardId": card_id,
        "transactionId": transaction_id,
        "value": value,
        "requestId": request_id,
        "outcome": outcome,
        "httpStatus": 200,
        "latencyMs": 1.0,
    }
    await store.append(stream, 0, [NewEvent("ProviderCallForwarded", canonical_json(json.dumps(data)))])
    return stream


async def write_forwarded(store: EventStore) -> None:
    """Acme: a 40.5 transaction forwarded twice (a replay: counted once), settled 30, cancelled 10.5;
    a refused call and a card creation, which move no money."""
    await forward(store, "CreateGiftCard", None, card_id=None)
    await forward(store, "CreateGiftCardTransaction", "40.5", request_id="order-9")
    await forward(store, "CreateGiftCardTransaction", "40.5", request_id="order-9")
    await forward(store, "CreateGiftCardTransactionSettlement", "30", transaction_id="t-9", request_id="s")
    await forward(store, "CreateGiftCardTransactionCancellation", "10.5", transaction_id="t-9", request_id="c")
    await forward(store, "CreateGiftCardTransaction", "1000", request_id="too-much", outcome="refused")


async def catch_up(pool: asyncpg.Pool) -> None:
    await ProjectionRunner(pool, read_models(NATIVE)).catch_up()


# ---- a large ledger, written fast ----------------------------------------------------------------

EVENTS_PER_FABRICATED_CARD = 6


def fabricated_card(now: datetime) -> list[tuple[str, int, str, str, str, bytes]]:
    """One card's events as the domain decides them (issue, +100, -30.50, settle 20, cancel 15 of the
    debit, cancel 5 of the credit: balance 79.50), as ``events`` rows with a valid hash chain."""
    card = issued_aggregate(
        now,
        relation_name=f"bulk-{uuid.uuid4().hex}",
        caption="c",
        profile_id="p",
        expiring_date=now + timedelta(days=365),
        code_tail="TAIL",
    )
    credit = card.credit(
        transaction_id=uuid.uuid4().hex, value=10000, description="l", request_id="l", order_info=None, now=now
    )
    debit = card.debit(
        transaction_id=uuid.uuid4().hex,
        value=3050,
        description="d",
        request_id="d",
        order_info=None,
        client=None,
        now=now,
    )
    card.settle(transaction_id=debit.id, oid=uuid.uuid4().hex, value=2000, request_id="s", now=now)
    card.cancel(transaction_id=debit.id, oid=uuid.uuid4().hex, value=1500, request_id="c1", now=now)
    card.cancel(transaction_id=credit.id, oid=uuid.uuid4().hex, value=500, request_id="c2", now=now)
    mapper = new_mapper()
    rows, last = [], b""
    for stored in map(mapper.to_stored_event, card.collect_events()):
        stream_id = str(stored.originator_id)
        last = chain_hash(last, stream_id, stored.originator_version, stored.topic, stored.state)
        rows.append((stream_id, stored.originator_version, stored.topic, stored.state.decode(), "{}", last))
    return rows


async def write_many_cards(pool: asyncpg.Pool, now: datetime, cards: int) -> None:
    records = [row for _ in range(cards) for row in fabricated_card(now)]
    async with pool.acquire() as connection:
        await connection.copy_records_to_table(
            "events", records=records, columns=["stream_id", "version", "type", "data", "metadata", "hash"]
        )


# ---- tampering, as someone with the database owner's rights -------------------------------------


async def as_owner_bypassing_immutability(pool: asyncpg.Pool, sql: str, *args: object) -> str:
    async with pool.acquire() as connection, connection.transaction():
        if await is_distributed(connection):
            # Citus refuses ALTER TABLE ... DISABLE TRIGGER on a distributed table: a superuser
            # switches the triggers off on the shards for this transaction (the SET goes with it).
            await connection.execute("set local citus.propagate_set_commands = 'local'")
            await connection.execute("set local session_replication_role = replica")
            return await connection.execute(sql, *args)
        await connection.execute("alter table events disable trigger events_no_update_or_delete")
        status = await connection.execute(sql, *args)
        await connection.execute("alter table events enable trigger events_no_update_or_delete")
    return status


# ---- the finance command line as a real process ------------------------------------------------


async def finance_cli(database_url: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m hub.cli ARGS`` (the ``audit``, ``export`` and ``finance`` commands) against the test
    database, with ``env`` added to the environment: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub.cli",
        *args,
        env={**os.environ, "GIFTCARD_DATABASE_URL": database_url, "GIFTCARD_NATIVE_PROVIDER_ID": NATIVE, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await output_within(process, CLI_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()
