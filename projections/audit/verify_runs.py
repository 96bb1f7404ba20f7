"""The record of each ``giftcard audit verify`` run, so that the auditor's view can show the latest.

``verify`` streams the ledger with one card in memory at a time; what is kept of a run is its
summary, written once it has finished, in a transaction of its own (verify's snapshot is read-only):
when it ran, whether every rule held, how many failures and the first ``FAILURES_RECORDED_MAX`` of
them, the totals it computed from its replay, and each read model's checkpoint and lag.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg
import msgspec

from ledger.postgres.rows import from_row
from ledger.postgres.tenancy import current_scope
from projections.audit.auditors import VerifyReport, render_report

FAILURES_RECORDED_MAX = 20  # the page shows these; the command prints every one

_INSERT = """
insert into verify_runs
    (started_at, finished_at, ok, events, streams, cards, failures_total, failures, totals, read_models, tenant_id)
values ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10::jsonb, $11)
returning id
"""

_LATEST = """
select id, tenant_id, started_at, finished_at, ok, events, streams, cards, failures_total,
       failures::text as failures, totals::text as totals, read_models::text as read_models
from verify_runs order by finished_at desc, id desc limit 1
"""

_encoder = msgspec.json.Encoder(decimal_format="number")  # numbers in jsonb, as `audit verify --json` prints


class RecordedFailure(msgspec.Struct, rename="camel", frozen=True):
    stream_id: str | None
    version: int | None
    position: int | None
    rule: str
    message: str


class RecordedTotal(msgspec.Struct, frozen=True):
    provider: str
    currency: str | None  # None: an external provider's amounts (its currency is not recorded)
    kind: str
    operation: str | None
    count: int
    amount: Decimal  # exact, in major units


class RecordedReadModel(msgspec.Struct, rename="camel", frozen=True):
    name: str
    checkpoint: dict[str, int]  # the last seq applied from each source (ledger.eventstore.commit_order)
    compared: int
    lag_events: int


class VerifyRun(msgspec.Struct, frozen=True):
    id: int
    tenant_id: str  # the tenant it walked; ALL_TENANTS ('*'): every one, which only an operator sees
    started_at: datetime
    finished_at: datetime
    ok: bool
    events: int
    streams: int
    cards: int
    failures_total: int
    failures: list[RecordedFailure]
    totals: list[RecordedTotal]
    read_models: list[RecordedReadModel]


async def record_run(pool: asyncpg.Pool, report: VerifyReport, started_at: datetime, finished_at: datetime) -> int:
    """Stores a finished run's summary as the run of the tenant in scope (or of every tenant: the
    operator's, migration 0020); returns its id."""
    rendered = render_report(report)
    return await pool.fetchval(
        _INSERT,
        started_at,
        finished_at,
        report.ok,
        report.events,
        report.streams,
        report.cards,
        report.failures_total,
        _encoder.encode(rendered["failures"][:FAILURES_RECORDED_MAX]).decode(),
        _encoder.encode(rendered["totals"]).decode(),
        _encoder.encode(rendered["readModels"]).decode(),
        current_scope(),
    )


async def latest_run(connection: asyncpg.Connection | asyncpg.Pool) -> VerifyRun | None:
    """The run that finished last, or None when verify never ran against this database."""
    row = await connection.fetchrow(_LATEST)
    if row is None:
        return None
    return from_row(
        VerifyRun,
        row,
        failures=msgspec.json.decode(row["failures"], type=list[RecordedFailure]),
        totals=msgspec.json.decode(row["totals"], type=list[RecordedTotal]),
        read_models=msgspec.json.decode(row["read_models"], type=list[RecordedReadModel]),
    )
