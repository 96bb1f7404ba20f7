"""What the auditor's overview (``GET /audit``) reads, in one read-only snapshot.

- the ledger's totals: the ``daily_totals`` read model summed over every day, per tenant, provider
  and currency (the tenants in scope: one, or every one for an operator) (flows gross, as ``/api/ledger/daily-totals`` counts them), with the outstanding
  liability of native cards (the running sum of their balance changes);
- that liability at the end of each of the last ``LIABILITY_DAYS_MAX`` days, per currency:
  the very figure ``/api/ledger/daily-totals`` answers (``daily_totals.list_totals``);
- the projection's freshness, read before its rows, so the rows are at least that fresh;
- the last ``audit verify`` run recorded (``projections.audit.verify_runs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta

import asyncpg

from projections import checkpoints
from projections.audit.verify_runs import VerifyRun, latest_run
from projections.checkpoints import ProjectionStatus
from projections.models import daily_totals

LIABILITY_DAYS_MAX = 366  # a year of days (and a leap day) per chart

_TOTALS = """
select tenant_id, provider, currency,
       sum(cards_issued) as cards_issued, sum(transactions) as transactions, sum(loaded) as loaded,
       sum(redeemed) as redeemed, sum(unclassified) as unclassified, sum(settled) as settled,
       sum(cancelled) as cancelled, sum(balance_change) as balance_change
from read_daily_totals
group by tenant_id, provider, currency
order by tenant_id, provider, currency nulls first
"""

_LAST_DAY = "select max(day) from read_daily_totals"


@dataclass(frozen=True)
class GroupTotals:
    """One tenant's provider's figures in one currency over every day projected (minor units of
    ``currency``; 10^-4 units when it is None: an external provider's, whose currency the hub does not record)."""

    tenant: str
    provider: str
    currency: str | None
    cards_issued: int
    transactions: int
    loaded: int
    redeemed: int
    unclassified: int
    settled: int
    cancelled: int
    liability: int | None  # native cards only: an external provider's balances are its own


@dataclass(frozen=True)
class Overview:
    freshness: ProjectionStatus | None  # None: no checkpoint (the migrations did not run)
    totals: list[GroupTotals]
    liability_by_day: dict[str, list[tuple[date, int]]] = field(default_factory=dict)  # currency -> days, oldest first
    latest_verify: VerifyRun | None = None


async def read_overview(pool: asyncpg.Pool, native_provider_id: str) -> Overview:
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        found = await checkpoints.statuses(connection, [daily_totals.NAME])
        totals = [_group(row, native_provider_id) for row in await connection.fetch(_TOTALS)]
        native_currencies = sorted({t.currency for t in totals if t.liability is not None and t.currency})
        liability = await _liability_by_day(connection, native_provider_id, len(native_currencies))
        return Overview(found[0] if found else None, totals, liability, await latest_run(connection))


def _group(row: asyncpg.Record, native_provider_id: str) -> GroupTotals:
    native = row["provider"] == native_provider_id
    return GroupTotals(
        tenant=row["tenant_id"],
        provider=row["provider"],
        currency=row["currency"],
        cards_issued=int(row["cards_issued"]),
        transactions=int(row["transactions"]),
        loaded=int(row["loaded"]),
        redeemed=int(row["redeemed"]),
        unclassified=int(row["unclassified"]),
        settled=int(row["settled"]),
        cancelled=int(row["cancelled"]),
        liability=int(row["balance_change"]) if native and row["currency"] is not None else None,
    )


async def _liability_by_day(
    connection: asyncpg.Connection, native_provider_id: str, currencies: int
) -> dict[str, list[tuple[date, int]]]:
    last_day = await connection.fetchval(_LAST_DAY)
    if last_day is None or currencies == 0:
        return {}
    since = last_day - timedelta(days=LIABILITY_DAYS_MAX - 1)
    where = daily_totals.TotalsFilter(provider=native_provider_id, since=since)
    rows, _ = await daily_totals.list_totals(connection, where, 0, LIABILITY_DAYS_MAX * currencies)
    series: dict[str, list[tuple[date, int]]] = {}
    for row in rows:  # in day order, so each series is oldest first
        if row["currency"] is not None:
            series.setdefault(row["currency"], []).append((row["day"], int(row["liability"])))
    return dict(sorted(series.items()))
