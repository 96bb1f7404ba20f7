"""Bulk issuance: cards per second of ``giftcard cards issue`` beside issuing them one by one.

bulk        ``ledger.application.bulk_issue.BulkIssuer.issue_to_file``, what ``giftcard cards issue`` runs:
            ``--count`` cards loaded with a value, ``--chunk-cards`` per transaction, each chunk's
            codes fsynced to the output before it commits.
one by one  ``Ledger.issue`` then ``Ledger.create_transaction`` (the Credit) per card, in
            sequence: the same two events per card, one transaction each, as a script calling
            the API card after card would write them, minus HTTP. ``--baseline-count`` cards
            (fewer: at its rate 100,000 would take minutes and say nothing more), half of them
            before the bulk run and half after it.

Both write to one fresh database (``giftcard_bench_bulk``, dropped and recreated) on the server
given, else an embedded PostgreSQL in a temporary directory. The rates are cards issued divided by
wall time, from the first card prepared to the last commit (the output file's final rename
included for bulk); the ratio is bulk's rate over one by one's.

    python -m bench.bulk_issue --count 100000 --json bench/results/bulk_issue.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from bench.event_store_appends import create_migrated_database, database_server, drop_database, server_facts
from bench.report import write_json
from ledger.application.bulk_issue import CHUNK_CARDS_DEFAULT, BatchDefaults, BatchRequest, BulkIssuer
from ledger.application.commands import IssueCard, Ledger
from ledger.eventstore.store import EventStore
from ledger.postgres.database import create_pool

BENCH_DATABASE = "giftcard_bench_bulk"  # its own name: dropped WITH (FORCE), other benchmarks may share the server
COUNT_DEFAULT = 100_000
BASELINE_COUNT_DEFAULT = 2_000
VALUE = Decimal("25.00")
CURRENCY = "USD"
VALIDITY = timedelta(days=365)
CODE_KEY = b"bench-code-key-32-bytes-long...."
POOL_SIZE_MAX = 4


async def run_bulk(pool: asyncpg.Pool, count: int, chunk_cards: int, output: Path) -> float:
    """Seconds to issue ``count`` cards in one batch, codes to ``output``."""
    issuer = BulkIssuer(Ledger(EventStore(pool), CODE_KEY), chunk_cards=chunk_cards)
    defaults = BatchDefaults(currency=CURRENCY, expiring_date=datetime.now(UTC) + VALIDITY)
    request = BatchRequest(batch_id="bench", count=count, value=VALUE)
    started = time.perf_counter()
    outcome = await issuer.issue_to_file(request, defaults, output, metadata={"actor": "bench"})
    elapsed = time.perf_counter() - started
    assert outcome.issued_now == count, f"issued {outcome.issued_now} of {count}"
    return elapsed


async def run_one_by_one(pool: asyncpg.Pool, numbers: range) -> float:
    """Seconds to issue and credit cards ``numbers`` one after the other through the Ledger."""
    ledger = Ledger(EventStore(pool), CODE_KEY)
    expiring = datetime.now(UTC) + VALIDITY
    started = time.perf_counter()
    for n in numbers:
        issued = await ledger.issue(
            IssueCard(
                relation_name=f"single-{n:06d}",
                caption="Gift card",
                profile_id="single",
                currency=CURRENCY,
                expiring_date=expiring,
            ),
            metadata={"actor": "bench"},
        )
        await ledger.create_transaction(
            str(issued.card.id),
            operation="Credit",
            value=VALUE,
            description="bulk issuance",
            request_id=f"issue:single:{n}",
            metadata={"actor": "bench"},
        )
    return time.perf_counter() - started


async def check_ledger(pool: asyncpg.Pool, cards: int) -> None:
    """Every card got its two events and its lookup row: a benchmark of a broken run proves nothing."""
    lookups = await pool.fetchval("select count(*) from card_lookup")
    events = await pool.fetchval("select count(*) from events")
    assert (lookups, events) == (cards, 2 * cards), f"{lookups} lookup rows and {events} events for {cards} cards"


# ---- the run -------------------------------------------------------------------------------------


async def run(server_url: str, args: argparse.Namespace) -> dict[str, Any]:
    url = await create_migrated_database(server_url, BENCH_DATABASE)
    pool = await create_pool(url, size_min=1, size_max=POOL_SIZE_MAX)
    try:
        with tempfile.TemporaryDirectory(prefix="giftcard-bench-codes-") as tmp:
            # One by one runs half before bulk and half after it: on a shared machine, load that
            # comes or goes during the run then weighs on both contenders, not on one.
            half = args.baseline_count // 2
            load_before = os.getloadavg()
            single_s = await run_one_by_one(pool, range(half))
            bulk_s = await run_bulk(pool, args.count, args.chunk_cards, Path(tmp) / "codes.csv")
            single_s += await run_one_by_one(pool, range(half, args.baseline_count))
            load_after = os.getloadavg()
        await check_ledger(pool, args.count + args.baseline_count)
        facts = await server_facts(url)
    finally:
        await pool.close()
        await drop_database(server_url, BENCH_DATABASE)
    bulk_rate, single_rate = args.count / bulk_s, args.baseline_count / single_s
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.bulk_issue " + shlex.join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load_before,
                    "load_after": load_after},
        "server": facts,
        "bulk": {"cards": args.count, "chunkCards": args.chunk_cards, "seconds": round(bulk_s, 3),
                 "cardsPerSecond": round(bulk_rate, 1)},
        "oneByOne": {"cards": args.baseline_count, "seconds": round(single_s, 3),
                     "cardsPerSecond": round(single_rate, 1)},
        "ratio": round(bulk_rate / single_rate, 1),
    }  # fmt: skip


def print_result(result: dict[str, Any]) -> None:
    bulk, single = result["bulk"], result["oneByOne"]
    print(f"{'contender':<12} {'cards':>8} {'seconds':>9} {'cards/s':>9}")
    print(f"{'bulk':<12} {bulk['cards']:>8} {bulk['seconds']:>9.2f} {bulk['cardsPerSecond']:>9.0f}")
    print(f"{'one by one':<12} {single['cards']:>8} {single['seconds']:>9.2f} {single['cardsPerSecond']:>9.0f}")
    load = result["machine"]
    print(
        f"bulk / one by one: {result['ratio']}x  (load average {load['load_before'][0]:.2f} before, "
        f"{load['load_after'][0]:.2f} after, {load['cpus']} CPUs)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk_issue", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=COUNT_DEFAULT, help=f"bulk cards (default {COUNT_DEFAULT})")
    parser.add_argument(
        "--baseline-count",
        type=int,
        default=BASELINE_COUNT_DEFAULT,
        help=f"cards issued one by one (default {BASELINE_COUNT_DEFAULT})",
    )
    parser.add_argument("--chunk-cards", type=int, default=CHUNK_CARDS_DEFAULT, help="cards per transaction")
    parser.add_argument("--database-url", help="a PostgreSQL server (default $GIFTCARD_DATABASE_URL, else embedded)")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    with database_server(args.database_url or os.environ.get("GIFTCARD_DATABASE_URL")) as server_url:
        result = asyncio.run(run(server_url, args))
    print_result(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
