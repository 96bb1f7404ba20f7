"""``giftcard audit card | verify`` and ``giftcard export transactions | liabilities``.

Thin calls into ``projections.audit.auditors`` and ``projections.exports.export_files``, which do the work.

With ``GIFTCARD_REPLICA_URL`` set, ``audit verify`` and the exports read that replica (never
upgrading its schema: it is read-only) and say on stderr how far behind the primary it was when
they started; ``audit card`` reads the primary. The verdict of a verify run is recorded on the
primary either way.

``audit verify --from DIR`` checks a tenant's export (``giftcard tenants export``) from its files
alone, with no database.

``--tenant ACCOUNT`` runs a command in that tenant's scope only (row-level security then shows it
nothing of another tenant); without it a command covers every tenant, as the operator's tools do.
Either way it says which tenants it covered.

Exit codes: 0 when everything holds (or the export is written); 1 when verify (or a card's audit)
finds a failure, or the ledger cannot be turned into exact figures; 2 for a bad argument or an
unknown card.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec

from hub.cli import arguments
from hub.cli.progress import progress_bar
from ledger.domain.errors import CardNotFound
from ledger.eventstore.store import EventStore
from ledger.postgres.database import Database, with_database
from ledger.postgres.replication import with_read_database
from ledger.postgres.tenancy import ALL_TENANTS, isolation_gap, known_tenants, tenant_scope
from projections.audit.auditors import (
    VERIFY_BATCH_EVENTS,
    VERIFY_WALKERS_MAX,
    CardAudit,
    VerifyReport,
    audit_card,
    render_card_audit,
    render_report,
    verify,
)
from projections.audit.replay import Failure
from projections.audit.verify_runs import record_run
from projections.exports.export_files import (
    EXPORT_BATCH_ROWS,
    FORMATS,
    LIABILITY_FORMATS,
    ExportFilter,
    LedgerInconsistent,
    LiabilityFile,
    count_card_events,
    count_export_events,
    export_liabilities,
    export_transactions,
    render_liabilities,
)
from projections.exports.tenant_export import verify_export
from projections.exports.totals import Totals, major

T = TypeVar("T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STDOUT = "-"  # as --output: the export goes to stdout

_json = msgspec.json.Encoder(decimal_format="number")  # as the HTTP API writes amounts


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Adds the ``audit`` and ``export`` command groups."""
    _add_audit(commands)
    _add_export(commands)


def _add_audit(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("audit", help="replay a card's history; verify the whole ledger")
    sub = group.add_subparsers(dest="audit_command", required=True)

    card = sub.add_parser("card", help="a card's events replayed, with the balance after each, and its state")
    card.add_argument("card_id")
    card.add_argument(
        "--as-of", type=arguments.instant, help="ISO 8601 instant (naive: UTC) to show the card's state at"
    )
    card.add_argument("--json", action="store_true", help="the JSON document GET /api/audit/cards/{id} answers")
    card.set_defaults(run=audit_card_command)

    check = sub.add_parser("verify", help="hash chains, invariants and read models; exit 1 naming every failure")
    check.add_argument("--json", action="store_true", help="one JSON report instead of lines")
    check.add_argument(
        "--from",
        dest="from_export",
        type=Path,
        metavar="DIR",
        help="check a tenant's export (giftcard tenants export) instead of the database: its files unchanged, "
        "every stream's hash chain, every card's replay; no database is used",
    )
    arguments.add_batch_size(check, "--batch-events-max", VERIFY_BATCH_EVENTS, "events per cursor fetch")
    add_tenant(check)
    check.set_defaults(run=verify_command)


def _add_export(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("export", help="finance exports, streamed from the events")
    sub = group.add_subparsers(dest="export_command", required=True)

    transactions = sub.add_parser("transactions", help="one row per transaction, settlement and cancellation")
    transactions.add_argument(
        "--format",
        choices=FORMATS,
        default="csv",
        help="csv (a header row, then one row per line), jsonl (one JSON object per line, exact decimal "
        "strings) or parquet (typed columns, exact decimal128 amounts) (default csv)",
    )
    transactions.add_argument(
        "--output", type=Path, required=True, help="the file to write; - writes to stdout (the summary goes to stderr)"
    )
    transactions.add_argument("--since", type=arguments.instant, help="effective date from (inclusive), ISO 8601")
    transactions.add_argument("--until", type=arguments.instant, help="effective date up to (exclusive), ISO 8601")
    transactions.add_argument("--provider", help="only this provider's rows (the native one's id, or an external)")
    transactions.add_argument("--currency", type=arguments.currency, help="only rows in this currency (native cards)")
    transactions.add_argument("--json", action="store_true", help="print the summary (rows, totals) as JSON")
    what = "events per cursor fetch and Parquet row group"
    arguments.add_batch_size(transactions, "--batch-rows", EXPORT_BATCH_ROWS, what)
    add_tenant(transactions)
    transactions.set_defaults(run=export_transactions_command)

    liabilities = sub.add_parser("liabilities", help="outstanding balance per card, total per currency")
    liabilities.add_argument("--as-of", type=arguments.day, required=True, help="a date (UTC): balances at its end")
    liabilities.add_argument("--output", type=Path, help="also write one row per card with a balance to this file")
    liabilities.add_argument("--format", choices=LIABILITY_FORMATS, default="csv", help="of --output (default csv)")
    liabilities.add_argument("--json", action="store_true", help="print the totals as JSON")
    add_tenant(liabilities)
    liabilities.set_defaults(run=export_liabilities_command)


# ---- audit ---------------------------------------------------------------------------------------


def audit_card_command(args: argparse.Namespace) -> int:
    native_provider_id = args.settings.native_provider_id
    try:
        audit = with_database(
            lambda pool: audit_card(EventStore(pool), args.card_id, args.as_of), args.settings.database
        )
    except CardNotFound as e:
        print(e.message, file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(_json.encode(render_card_audit(audit, native_provider_id)).decode())
    else:
        _print_card_audit(audit, native_provider_id)
    return EXIT_OK if not audit.failures else EXIT_FAILED


def _print_card_audit(audit: CardAudit, provider: str) -> None:
    document = render_card_audit(audit, provider)
    as_of = f", as of {document['asOf']}" if audit.as_of else ""
    print(f"card {audit.card_id} ({audit.currency}, provider {provider}){as_of}")
    print(
        f"{'ver':>5}  {'effective at':<27} {'event':<10} {'transaction':<32} {'op':<6} {'amount':>14} {'balance':>14}"
    )
    for entry in document["events"]:
        mark = " (after as-of)" if entry["afterAsOf"] else ""
        balance = entry.get("balance", "not applied")
        print(
            f"{entry['version']:>5}  {entry['effectiveAt']:<27} {entry['type']:<10} "
            f"{entry.get('transactionId') or '':<32} {entry.get('operation') or '':<6} "
            f"{_text(entry.get('amount')):>14} {_text(balance):>14}{mark}"
        )
    state = document["state"]
    if state is None:
        print("state: the card did not exist yet")
    else:
        print(
            f"state at version {state['version']}: balance {state['balance']}, authorized {state['authorized']}, "
            f"settled {state['settled']}, credited {state['credited']}, debited {state['debited']}"
        )
    _print_failures(audit.failures)


# ---- verify ----------------------------------------------------------------------------------------


def verify_command(args: argparse.Namespace) -> int:
    settings = args.settings
    print_each = None if args.json else (lambda failure: print(f"FAIL {failure.line()}", flush=True))
    if args.from_export is not None:
        return _verify_export_command(args.from_export, args.json, print_each)

    # A walker process connects by URL: an embedded PostgreSQL (no GIFTCARD_DATABASE_URL) is walked by one.
    # On a replica the walkers import the snapshot verify exports there (a hot standby can, since PG 10).
    replica_url = settings.replica_url
    database_url = replica_url or settings.database_url
    started_at = datetime.now(UTC)

    async def work(pool: asyncpg.Pool) -> tuple[Coverage, VerifyReport]:
        coverage = await covered_tenants(pool, args.tenant)
        with tenant_scope(coverage.scope):
            return coverage, await walk(pool, coverage)

    async def walk(pool: asyncpg.Pool, coverage: Coverage) -> VerifyReport:
        async with progress_bar(pool, "verify", _count_events) as bar:
            report = await verify(
                pool,
                settings.native_provider_id,
                batch_events_max=args.batch_events_max,
                on_failure=print_each,
                on_progress=bar.update,
                database_url=database_url,
                walkers=VERIFY_WALKERS_MAX if database_url else 1,
            )
        if replica_url is None:
            with tenant_scope(coverage.recorded_as):
                await _record_verify_run(pool, report, started_at)
        return report

    try:
        coverage, report = with_read_database(work, settings.database, replica_url)
    except TenantRefused as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    if replica_url is not None:  # a replica is read-only: the verdict is kept on the primary
        _record_verify_run_on_primary(report, started_at, settings.database, coverage.recorded_as)
    if args.json:
        print(_json.encode({**render_report(report), "tenants": coverage.tenants}).decode())
    else:
        print_coverage(coverage)
        _print_verify_summary(report)
    return EXIT_OK if report.ok else EXIT_FAILED


def _verify_export_command(folder: Path, as_json: bool, print_each: Callable[[Failure], None] | None) -> int:
    manifest, report = verify_export(folder, print_each)
    if as_json:
        print(_json.encode(render_report(report)).decode())
    else:
        verdict = "all hold" if report.ok else f"{report.failures_total} failure(s)"
        print(f"verified {report.events} event(s) in {report.streams} stream(s), {report.cards} card(s)", end="")
        if manifest is not None:
            print(f" of tenant {manifest.account} (exported {manifest.exported_at:%Y-%m-%d %H:%M:%S} UTC)", end="")
        print(f": {verdict}")
    return EXIT_OK if report.ok else EXIT_FAILED


async def _record_verify_run(pool: asyncpg.Pool, report: VerifyReport, started_at: datetime) -> None:
    """Kept for the auditor's view (GET /audit). A database role that may not write it loses only that:
    the verdict is the exit code and the report printed, so it is a warning, never a failure."""
    try:
        run_id = await record_run(pool, report, started_at, datetime.now(UTC))
    except asyncpg.PostgresError as e:
        print(f"warning: this run's result was not recorded for GET /audit: {e}", file=sys.stderr)
        return
    print(f"recorded as verify run {run_id} (shown on GET /audit)", file=sys.stderr)


def _record_verify_run_on_primary(report: VerifyReport, started_at: datetime, primary: Database, scope: str) -> None:
    """After reading a replica; a primary out of reach loses only the record, as a refused write does."""

    async def record(pool: asyncpg.Pool) -> None:
        with tenant_scope(scope):
            await _record_verify_run(pool, report, started_at)

    try:
        with_database(record, primary, pool_size_max=1)
    except (OSError, TimeoutError, asyncpg.PostgresError) as e:
        print(f"warning: this run's result was not recorded for GET /audit: {e}", file=sys.stderr)


def _print_verify_summary(report: VerifyReport) -> None:
    verdict = "all hold" if report.ok else f"{report.failures_total} failure(s)"
    print(f"verified {report.events} event(s) in {report.streams} stream(s), {report.cards} card(s): {verdict}")
    for result in report.read_models:
        print(
            f"read model {result.name}: {result.compared} row(s) compared at checkpoint "
            f"{result.checkpoint}, {result.lag_events} later event(s) not projected yet"
        )
    _print_totals(report.totals)


# ---- exports ---------------------------------------------------------------------------------------


def export_transactions_command(args: argparse.Namespace) -> int:
    if str(args.output) == STDOUT:
        return _export_to_stdout(args)
    where = ExportFilter(since=args.since, until=args.until, provider=args.provider, currency=args.currency)
    if where.since and where.until and where.until < where.since:
        print("--until must not be before --since", file=sys.stderr)
        return EXIT_USAGE

    async def work(pool: asyncpg.Pool):
        async with progress_bar(pool, "export", count_export_events) as bar:
            return await export_transactions(
                pool,
                args.output,
                args.format,
                args.settings.native_provider_id,
                where,
                batch_rows=args.batch_rows,
                on_progress=bar.update,
            )

    try:
        coverage, result = read_in_tenants(args, work)
    except ReadRefused as e:
        return e.said()
    if args.json:
        summary = {"output": str(args.output), "format": args.format, "rows": result.rows, "tenants": coverage.tenants}
        print(_json.encode({**summary, "totals": result.totals.render()}).decode())
    else:
        print_coverage(coverage)
        print(f"exported {result.rows} row(s) to {args.output} ({args.format})")
        _print_totals(result.totals)
    return EXIT_OK


def _export_to_stdout(args: argparse.Namespace) -> int:
    """Written to a file first and copied out once complete: a failed export sends nothing down the
    pipe that could pass for a whole one. The summary goes to stderr, off the data's way."""
    with tempfile.TemporaryDirectory(prefix="giftcard-export-") as folder:
        staged = Path(folder) / f"transactions.{args.format}"
        with contextlib.redirect_stdout(sys.stderr):
            code = export_transactions_command(argparse.Namespace(**{**vars(args), "output": staged}))
        if code == EXIT_OK:
            with staged.open("rb") as written:
                shutil.copyfileobj(written, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    return code


def export_liabilities_command(args: argparse.Namespace) -> int:
    async def work(pool: asyncpg.Pool):
        rows = None if args.output is None else LiabilityFile(args.output, args.format)
        try:
            async with progress_bar(pool, "liabilities", count_card_events) as bar:
                result = await export_liabilities(
                    pool, args.as_of, on_card=None if rows is None else rows.write, on_progress=bar.update
                )
        except BaseException:
            if rows is not None:
                rows.discard()
            raise
        if rows is not None:
            rows.commit()
        return result

    try:
        coverage, result = read_in_tenants(args, work)
    except ReadRefused as e:
        return e.said()
    document = {**render_liabilities(result), "tenants": coverage.tenants}
    if args.json:
        print(_json.encode(document).decode())
        return EXIT_OK
    print_coverage(coverage)
    print(f"outstanding at the end of {document['asOf']} (UTC, before {document['cutoff']}):")
    for total in document["totals"]:
        print(f"  {total['currency']:<4} {total['outstanding']:>20}  over {total['cards']} card(s)")
    if not document["totals"]:
        print("  nothing outstanding")
    return EXIT_OK


# ---- which tenants a command covers ---------------------------------------------------------------

TENANTS_NAMED_MAX = 20  # a deployment of hundreds of stores: the first ones named, the rest counted


class TenantRefused(Exception):
    """--tenant names no tenant, or one that row-level security cannot keep apart here (exit 2)."""


@dataclass(frozen=True)
class Coverage:
    """The tenants a command reads (``scope``), and as whose a verify run is recorded: a run over every
    tenant is the operator's (ALL_TENANTS), but the one tenant's when there is only one."""

    tenants: list[str]
    scope: str

    @property
    def recorded_as(self) -> str:
        return self.tenants[0] if len(self.tenants) == 1 else self.scope


def add_tenant(parser: argparse.ArgumentParser) -> None:
    arguments.add_tenant_filter(parser, "only this store's (VTEX account's) data, in its scope")


async def covered_tenants(pool: asyncpg.Pool, tenant: str | None) -> Coverage:
    known = await known_tenants(pool)
    if tenant is None:
        return Coverage(known, ALL_TENANTS)
    if tenant not in known:
        raise TenantRefused(f"there is no tenant {tenant!r} (the tenants: {_named(known)})")
    gap = await isolation_gap(pool)
    if gap is not None:  # the scope would narrow nothing: every tenant's rows would be read as this one's
        raise TenantRefused(
            f"--tenant needs row-level security, and it does not keep tenants apart here ({gap}): "
            "run as the role `giftcard db grant` sets up (--database-url), see the README's Many stores"
        )
    return Coverage([tenant], tenant)


class ReadRefused(Exception):
    """A report not made: why (for stderr), and the exit code that says so."""

    def __init__(self, why: str, exit_code: int) -> None:
        super().__init__(why)
        self.exit_code = exit_code

    def said(self) -> int:
        print(str(self), file=sys.stderr)
        return self.exit_code


def read_in_tenants(args: argparse.Namespace, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> tuple[Coverage, T]:
    """``work`` on the read database (the replica, when one is set) in the scope of ``args.tenant``
    (every tenant's when None), with the tenants it covered. Raises ReadRefused: a ``--tenant`` it
    cannot keep apart is a usage error; a ledger whose report would be wrong, a failure."""
    try:
        return with_read_database(in_tenants(args.tenant, work), args.settings.database, args.settings.replica_url)
    except TenantRefused as e:
        raise ReadRefused(str(e), EXIT_USAGE) from e
    except LedgerInconsistent as e:
        raise ReadRefused(str(e), EXIT_FAILED) from e


def in_tenants(tenant: str | None, work: Callable[[asyncpg.Pool], Awaitable[T]]):
    """``work`` in the scope of ``tenant`` (every tenant when None), returning the coverage with its result."""

    async def scoped(pool: asyncpg.Pool) -> tuple[Coverage, T]:
        coverage = await covered_tenants(pool, tenant)
        with tenant_scope(coverage.scope):
            return coverage, await work(pool)

    return scoped


def print_coverage(coverage: Coverage) -> None:
    if coverage.scope == ALL_TENANTS:
        print(f"tenants: every tenant ({len(coverage.tenants)}): {_named(coverage.tenants)}")
    else:
        print(f"tenants: {coverage.scope}")


def _named(tenants: list[str]) -> str:
    shown = ", ".join(tenants[:TENANTS_NAMED_MAX])
    more = len(tenants) - TENANTS_NAMED_MAX
    return f"{shown} and {more} more" if more > 0 else shown or "none"


# ---- plumbing ----------------------------------------------------------------------------------------


def _print_totals(totals: Totals) -> None:
    print("totals (provider, currency, kind, operation: count, amount):")
    for key in totals.sorted_keys():
        amount = major(totals.units(key), key.currency)
        currency = key.currency or "(not recorded)"
        print(f"  {key.provider} {currency} {key.kind} {key.operation or '-'}: {totals.count(key)}, {amount}")


def _print_failures(failures: list[Failure]) -> None:
    if not failures:
        print("hash chain and invariants: ok")
        return
    print(f"{len(failures)} failure(s):")
    for failure in failures:
        print(f"FAIL {failure.line()}")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


async def _count_events(pool: asyncpg.Pool) -> int:
    return await pool.fetchval("select count(*) from events")
