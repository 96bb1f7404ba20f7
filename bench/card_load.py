"""How long a long-lived card takes to load: snapshot + tail against a replay from its first event.

A loyalty card can collect tens of thousands of transactions; every command on it starts by
loading it (unless it is cached). The ledger snapshots a card every 100 events, so a load reads
the snapshot and at most 99 events. This measures both paths on the same card, in one run:

    python -m bench.card_load [--transactions 10000] [--loads 20] [--database-url URL] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.event_store_appends import create_bench_database, database_server, drop_database
from bench.report import write_json
from ledger.application.commands import IssueCard, Ledger
from ledger.eventstore.store import EventStore
from ledger.postgres.database import create_pool

BENCH_DATABASE = "giftcard_bench_card_load"
CHUNK_TRANSACTIONS = 500


async def long_card(ledger: Ledger, transactions: int) -> str:
    """A card with ``transactions`` Debits after one big Credit, written through the ledger itself."""
    card_id = str((await ledger.issue(IssueCard(
        relation_name=f"long-{uuid.uuid4().hex}", caption="bench", profile_id="bench", currency="USD",
        expiring_date=datetime.now(UTC) + timedelta(days=365),
    ))).card.id)  # fmt: skip
    await ledger.create_transaction(
        card_id, operation="Credit", value=transactions, description="load", request_id="load"
    )
    for n in range(transactions):
        await ledger.create_transaction(card_id, operation="Debit", value=1, description="bench", request_id=f"d{n}")
    return card_id


async def timed_loads(store: EventStore, code_key: bytes, card_id: str, loads: int) -> list[float]:
    """Each load by a fresh Ledger, so nothing is cached in process."""
    times = []
    for _ in range(loads):
        ledger = Ledger(store, code_key)
        started = time.perf_counter()
        await ledger.card(card_id)
        times.append(time.perf_counter() - started)
    return times


async def run(server_url: str, args: argparse.Namespace) -> dict[str, Any]:
    url = await create_bench_database(server_url, BENCH_DATABASE)
    pool = await create_pool(url, size_min=1, size_max=4)
    try:
        store = EventStore(pool)
        ledger = Ledger(store, b"k" * 32)
        card_id = await long_card(ledger, args.transactions)
        with_snapshot = await timed_loads(store, ledger.code_key, card_id, args.loads)
        await pool.execute("delete from snapshots where stream_id = $1", card_id)
        full_replay = await timed_loads(store, ledger.code_key, card_id, max(3, args.loads // 4))
        events = await pool.fetchval("select count(*) from events where stream_id = $1", card_id)
    finally:
        await pool.close()
        await drop_database(server_url, BENCH_DATABASE)
    snapshot_ms = statistics.median(with_snapshot) * 1000
    replay_ms = statistics.median(full_replay) * 1000
    return {
        "benchmark": "card_load",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "transactions": args.transactions,
        "events": events,
        "snapshot_load_ms_median": round(snapshot_ms, 2),
        "snapshot_load_ms_max": round(max(with_snapshot) * 1000, 2),
        "full_replay_ms_median": round(replay_ms, 2),
        "speedup": round(replay_ms / snapshot_ms, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.card_load", description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=10_000, help="Debits on the card (%(default)s)")
    parser.add_argument("--loads", type=int, default=20, help="timed loads with the snapshot (%(default)s)")
    parser.add_argument("--database-url", help="server to use (default: $GIFTCARD_DATABASE_URL or embedded)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with database_server(args.database_url) as server_url:
        figures = asyncio.run(run(server_url, args))
    print(
        f"card with {figures['transactions']:,} transactions ({figures['events']:,} events): "
        f"load with snapshot {figures['snapshot_load_ms_median']:.1f} ms (median; max "
        f"{figures['snapshot_load_ms_max']:.1f}), full replay {figures['full_replay_ms_median']:.1f} ms "
        f"({figures['speedup']:g}x slower)"
    )
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
