"""``giftcard finance rollforward | journal | breakage | dormant``: closing the month.

Thin calls into ``projections.finance``, which walks the card events once per report. Like the
exports, they read ``GIFTCARD_REPLICA_URL`` when it is set, and show a progress bar when stderr is
a terminal. The expiry policy and the chart of accounts come from ``GIFTCARD_FINANCE_CONFIG``.

``--tenant ACCOUNT`` reports on that store alone (in its scope, as ``export`` does); without it a
report covers every store, and its first line says which.

Exit codes: 0 when the report is written; 1 when the ledger cannot be turned into exact figures
(``audit verify`` names why); 2 for a bad argument or configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec

from hub.cli import arguments
from hub.cli.finance import EXIT_OK, EXIT_USAGE, ReadRefused, add_tenant, print_coverage, read_in_tenants
from hub.cli.progress import progress_bar
from projections.exports.export_files import LiabilityFile, count_card_events
from projections.exports.totals import major
from projections.finance.breakage import METHODS, PROPORTIONAL, estimate_breakage, render_breakage
from projections.finance.config import FinanceConfig, FinanceConfigError, finance_config_at
from projections.finance.dormancy import DORMANT_COLUMNS, DormancyResult, dormant_cards
from projections.finance.journal import JOURNAL_FORMATS, render_journal, write_journal
from projections.finance.rollforward import Period, render_roll_forward, roll_forward, write_roll_forward_csv

T = TypeVar("T")

_json = msgspec.json.Encoder(decimal_format="number")  # as the HTTP API and the exports' summaries write amounts


def add_commands(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("finance", help="close the month: roll-forward, journal, breakage, dormancy")
    sub = group.add_subparsers(dest="finance_command", required=True)

    rollforward = sub.add_parser("rollforward", help="per currency: opening liability, movements, closing liability")
    _add_period(rollforward)
    rollforward.add_argument("--currency", type=arguments.currency, help="only this currency")
    rollforward.add_argument("--json", type=Path, metavar="FILE", help="also write the roll-forward as JSON")
    rollforward.add_argument(
        "--csv", type=Path, metavar="FILE", help="also write it as CSV (currency, line, count, amount)"
    )
    add_tenant(rollforward)
    rollforward.set_defaults(run=rollforward_command)

    journal = sub.add_parser("journal", help="double-entry lines for an accounting system, balanced per entry")
    _add_period(journal)
    journal.add_argument("--format", choices=JOURNAL_FORMATS, default="csv", help="default csv")
    journal.add_argument("--output", type=Path, required=True, help="the file to write")
    add_tenant(journal)
    journal.set_defaults(run=journal_command)

    breakage = sub.add_parser("breakage", help="the breakage rate from the ledger's history, and what is recognised")
    breakage.add_argument("--as-of", type=arguments.day, required=True, help="a date (UTC): as at its end")
    breakage.add_argument("--method", choices=METHODS, default=PROPORTIONAL, help="default proportional")
    breakage.add_argument("--json", type=Path, metavar="FILE", help="also write the report and its inputs as JSON")
    add_tenant(breakage)
    breakage.set_defaults(run=breakage_command)

    dormant = sub.add_parser("dormant", help="cards with value and no shopper activity for N years")
    dormant.add_argument("--as-of", type=arguments.day, required=True, help="a date (UTC): as at its end")
    dormant.add_argument("--years", type=arguments.bounded_int(1, 100), required=True, help="years without activity")
    dormant.add_argument("--output", type=Path, help="also write one row per dormant card (CSV) to this file")
    add_tenant(dormant)
    dormant.set_defaults(run=dormant_command)


def _add_period(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="first_day", type=arguments.day, required=True, help="first day (UTC), inclusive"
    )
    parser.add_argument("--to", dest="last_day", type=arguments.day, required=True, help="last day (UTC), inclusive")


def rollforward_command(args: argparse.Namespace) -> int:
    def report(pool: asyncpg.Pool, config: FinanceConfig, on_progress: Callable[[int], None]) -> Awaitable[Any]:
        return roll_forward(
            pool, Period(args.first_day, args.last_day), config, currency=args.currency, on_progress=on_progress
        )

    code, result = _run(args, "rollforward", report)
    if result is None:
        return code
    document = render_roll_forward(result)
    if args.json is not None:
        args.json.write_bytes(_json.encode(document) + b"\n")
    if args.csv is not None:
        write_roll_forward_csv(result, args.csv)
    _print_roll_forward(document)
    return EXIT_OK


def journal_command(args: argparse.Namespace) -> int:
    def report(pool: asyncpg.Pool, config: FinanceConfig, on_progress: Callable[[int], None]) -> Awaitable[Any]:
        period = Period(args.first_day, args.last_day)
        return write_journal(pool, period, config, args.output, args.format, on_progress=on_progress)

    code, result = _run(args, "journal", report)
    if result is None:
        return code
    document = render_journal(result, args.output, args.format)
    print(f"wrote {document['entries']} entries, {document['lines']} lines to {args.output} ({args.format})")
    for total in document["totals"]:
        print(f"  {total['currency']:<4} debit {total['debit']:>20}  credit {total['credit']:>20}")
    return EXIT_OK


def breakage_command(args: argparse.Namespace) -> int:
    def report(pool: asyncpg.Pool, config: FinanceConfig, on_progress: Callable[[int], None]) -> Awaitable[Any]:
        return estimate_breakage(pool, args.as_of, args.method, config, on_progress=on_progress)

    code, result = _run(args, "breakage", report)
    if result is None:
        return code
    document = render_breakage(result)
    if args.json is not None:
        args.json.write_bytes(_json.encode(document) + b"\n")
    print(f"breakage as at the end of {document['asOf']} ({document['method']} method):")
    for currency in document["currencies"]:
        inputs = currency["rateInputs"]
        print(
            f"  {currency['currency']:<4} rate {currency['rate']} ({inputs['leftAtExpiry']} left on "
            f"{inputs['expiredCards']} expired card(s) loaded with {inputs['loadedOnExpiredCards']}), "
            f"recognised to date {currency['recognisedToDate']} ({currency['expiryPolicy']})"
        )
    return EXIT_OK


def dormant_command(args: argparse.Namespace) -> int:
    def report(pool: asyncpg.Pool, config: FinanceConfig, on_progress: Callable[[int], None]) -> Awaitable[Any]:
        return _dormant_to_file(pool, config, args, on_progress)

    code, result = _run(args, "dormant", report)
    if result is None:
        return code
    print(
        f"cards owing value at the end of {result.as_of.isoformat()} with no shopper activity since "
        f"{result.quiet_since.isoformat()} ({result.years} year(s)):"
    )
    for currency, owed in sorted(result.owed.items()):
        print(f"  {currency:<4} {major(owed, currency):>20}  over {result.cards[currency]} card(s)")
    if not result.owed:
        print("  none")
    return EXIT_OK


async def _dormant_to_file(
    pool: asyncpg.Pool, config: FinanceConfig, args: argparse.Namespace, on_progress: Callable[[int], None]
) -> DormancyResult:
    if args.output is None:
        return await dormant_cards(pool, args.as_of, args.years, config, lambda card: None, on_progress=on_progress)
    rows = LiabilityFile(args.output, "csv", DORMANT_COLUMNS, amount="owed")
    try:
        result = await dormant_cards(pool, args.as_of, args.years, config, rows.write, on_progress=on_progress)
    except BaseException:
        rows.discard()
        raise
    rows.commit()
    return result


# ---- plumbing ----------------------------------------------------------------------------------------


def _run(
    args: argparse.Namespace,
    what: str,
    report: Callable[[asyncpg.Pool, FinanceConfig, Callable[[int], None]], Awaitable[T]],
) -> tuple[int, T | None]:
    """The report over the read database, or the exit code and message of why there is none."""
    if getattr(args, "last_day", None) is not None and args.last_day < args.first_day:
        print("--to must not be before --from", file=sys.stderr)
        return EXIT_USAGE, None
    try:
        config = finance_config_at(args.settings.finance_config)
    except FinanceConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE, None

    async def work(pool: asyncpg.Pool) -> T:
        async with progress_bar(pool, what, count_card_events) as bar:
            return await report(pool, config, bar.update)

    try:
        coverage, result = read_in_tenants(args, work)
    except ReadRefused as e:
        return e.said(), None
    print_coverage(coverage)
    return EXIT_OK, result


def _print_roll_forward(document: dict[str, Any]) -> None:
    print(
        f"liability roll-forward {document['from']} .. {document['to']} (UTC, {document['opensAt']} to {document['closesAt']}):"
    )
    for rolled in document["currencies"]:
        currency = rolled["currency"]
        print(f"  {currency} opening {rolled['opening']:>34}")
        for line in rolled["movements"]:
            print(f"  {currency}   {line['movement']:<30} {line['amount']:>12}  ({line['count']})")
        print(f"  {currency} closing {rolled['closing']:>34}")
    if not document["currencies"]:
        print("  nothing owed and nothing moved")
