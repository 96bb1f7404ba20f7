"""Projection catch-up, ``audit verify`` and CSV export rates over a large generated ledger.

The ledger is written fast but is genuine: every card's events are decided by the ``GiftCard``
aggregate (Issued, Credited, Debited, Settled, Cancelled mixed, about 20 events a card spread over
many days) and stored through ``ledger.eventstore.codec``'s mapper and ``EventStore.append_many`` (hash
chains and all), a chunk of cards per statement. Then, on that ledger:

- catch-up: all three read models from zero with one ``ProjectionRunner``, as a service catches up,
  timed until every one has the last event (events/s of the ledger); then each alone, from zero
  with a runner of its own;
- verify: ``python -m hub.cli audit verify --json`` as a subprocess (events/s);
- export: ``python -m hub.cli export transactions --format csv`` as a subprocess
  (rows/s, and its peak resident set from ``getrusage(RUSAGE_CHILDREN).ru_maxrss``).

    python -m bench.projections_perf [--events 1000000 | --quick] [--database-url URL | --citus] [--json FILE]

``--citus``: on a Citus cluster (a coordinator and two workers on loopback ports, as the tests
start it), the ledger distributed by card: the runner then follows every shard's commit order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench.citus import citus_cluster
from bench.event_store_appends import create_bench_database, database_server, drop_database
from bench.report import write_json
from ledger.eventstore.codec import new_mapper
from ledger.eventstore.commit_order import START
from ledger.eventstore.store import EventStore, NewEvent, StreamAppend
from ledger.postgres.database import create_pool
from ledger.postgres.migrate import upgrade
from projections import checkpoints, read_models
from projections.projection import Projection
from projections.runner import ProjectionRunner
from tests.cards import issued_aggregate

BENCH_DATABASE = "giftcard_bench_projections"
NATIVE = "VtexGiftCard"
EVENTS_DEFAULT = 1_000_000
EVENTS_QUICK = 50_000
CARDS_PER_APPEND = 500
TARGET_CATCH_UP = 20_000  # events/s
TARGET_VERIFY = 50_000  # events/s
TARGET_EXPORT = 100_000  # rows/s
TARGET_EXPORT_PEAK_MB = 200
CURRENCIES = ("USD", "EUR", "BRL")


# ---- the ledger ------------------------------------------------------------------------------------


def card_events(rng: random.Random, mapper: Any, start: datetime, events_max: int) -> tuple[str, list[NewEvent]]:
    """One card's history, decided by the aggregate: a load, then debits (settled, cancelled or
    left held), partial refunds and the odd reload, each a few hours after the one before."""
    now = start
    card = issued_aggregate(
        now,
        relation_name=f"bench-{uuid.uuid4().hex}",
        caption="bench",
        profile_id="bench",
        currency=rng.choice(CURRENCIES),
        expiring_date=now + timedelta(days=3650),
        code_tail="0000",
    )
    n = 0

    def step() -> datetime:
        nonlocal now, n
        n += 1
        now += timedelta(minutes=rng.randint(10, 600))
        return now

    card.credit(
        transaction_id=uuid.uuid4().hex, value=1_000_000, description="load", request_id="r0",
        order_info=None, now=step(),
    )  # fmt: skip
    while len(card.pending_events) < events_max:
        roll = rng.random()
        if roll < 0.1:
            card.credit(
                transaction_id=uuid.uuid4().hex, value=rng.randint(100, 50_000), description="reload",
                request_id=f"r{n}", order_info={"orderId": f"o{n}"}, now=step(),
            )  # fmt: skip
            continue
        value = rng.randint(1, 5_000)
        if card.balance < value:
            break
        transaction_id = uuid.uuid4().hex
        card.debit(
            transaction_id=transaction_id, value=value, description="purchase", request_id=f"r{n}",
            order_info={"orderId": f"o{n}"}, client=None, now=step(),
        )  # fmt: skip
        if roll < 0.75:
            card.settle(
                transaction_id=transaction_id, oid=uuid.uuid4().hex, value=value, request_id=f"s{n}", now=step()
            )
            if roll < 0.2:
                refund = max(1, value // 3)
                card.cancel(
                    transaction_id=transaction_id, oid=uuid.uuid4().hex, value=refund, request_id=f"c{n}", now=step()
                )
        elif roll < 0.9:
            card.cancel(
                transaction_id=transaction_id, oid=uuid.uuid4().hex, value=value, request_id=f"c{n}", now=step()
            )
    stored = [mapper.to_stored_event(e) for e in card.collect_events()]
    return str(card.id), [NewEvent(s.topic, s.state) for s in stored]


async def write_ledger(pool: asyncpg.Pool, events_wanted: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    mapper = new_mapper()
    store = EventStore(pool)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    written = 0
    while written < events_wanted:
        appends = []
        while len(appends) < CARDS_PER_APPEND and written < events_wanted:
            start = base + timedelta(days=rng.randint(0, 300), minutes=rng.randint(0, 1440))
            card_id, events = card_events(rng, mapper, start, min(rng.randint(12, 28), events_wanted - written))
            appends.append(StreamAppend(card_id, 0, events))
            written += len(events)
        await store.append_many(appends)
    return written


# ---- the measurements --------------------------------------------------------------------------------


async def caught_up(pool: asyncpg.Pool, names: list[str]) -> bool:
    statuses = await checkpoints.statuses(pool, names)
    return len(statuses) == len(names) and not any(status.lag_events for status in statuses)


async def from_zero(pool: asyncpg.Pool, projections: list[Projection]) -> None:
    """Empties the projections' tables and puts their checkpoints back before the first event."""
    tables = ", ".join(t for p in projections for t in p.tables)
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(f"truncate {tables}")
        await checkpoints.ensure_checkpoints(connection, [p.name for p in projections])
        for p in projections:
            await checkpoints.replace(connection, p.name, START, 0, None)
    await pool.execute("vacuum analyze")
    await pool.execute("checkpoint")  # flushing the ledger just written is not the catch-up's work


async def time_catch_up(pool: asyncpg.Pool, projections: list[Projection], batch_events_max: int | None) -> float:
    """Seconds for one runner of ``projections`` to bring them all from zero to the last event
    (``catch_up`` is called again should a projection not have it yet: it must, but the timing is
    of the whole way there)."""
    await from_zero(pool, projections)
    options = {} if batch_events_max is None else {"batch_events_max": batch_events_max}
    runner = ProjectionRunner(pool, projections, **options)
    names = [p.name for p in projections]
    started = time.perf_counter()
    await runner.catch_up()
    while not await caught_up(pool, names):
        await asyncio.sleep(0.005)
        await runner.catch_up()
    return time.perf_counter() - started


async def catch_up(pool: asyncpg.Pool, events: int, batch_events_max: int | None) -> dict[str, dict[str, float]]:
    """All three read models from zero with one runner, as a service catches up, then each alone."""
    seconds = await time_catch_up(pool, read_models(NATIVE), batch_events_max)
    figures = {"all three": {"events": events, "seconds": round(seconds, 2), "events_per_s": events / seconds}}
    for projection in read_models(NATIVE):
        seconds = await time_catch_up(pool, [projection], batch_events_max)
        figures[projection.name] = {"events": events, "seconds": round(seconds, 2), "events_per_s": events / seconds}
    return figures


def cli(url: str, *args: str) -> tuple[float, int, str, int]:
    """Seconds, peak RSS in KiB, stdout and exit code of ``python -m hub.cli ARGS``
    (the RSS from ``wait4``: this child's own, not the largest of every child so far)."""
    env = {**os.environ, "GIFTCARD_DATABASE_URL": url, "GIFTCARD_NATIVE_PROVIDER_ID": NATIVE}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "hub.cli", *args], env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode not in (0, 1):
            raise RuntimeError(f"{args[:2]} failed ({child.returncode}): {err.read().decode()[-2000:]}")
        return seconds, usage.ru_maxrss, out.read().decode(), child.returncode


def export(url: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="giftcard-export-") as tmp:
        output = Path(tmp) / "transactions.csv"
        seconds, peak_kib, _, code = cli(url, "export", "transactions", "--format", "csv", "--output", str(output))
        if code != 0:
            raise RuntimeError(f"export exited {code}")
        with output.open("rb") as f:
            rows = sum(1 for _ in f) - 1
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": rows / seconds, "peak_rss_mb": peak_kib / 1024}


def verify(url: str, events: int) -> dict[str, Any]:
    seconds, peak_kib, stdout, code = cli(url, "audit", "verify", "--json")
    report = json.loads(stdout)
    return {
        "events": events,
        "seconds": round(seconds, 2),
        "events_per_s": events / seconds,
        "ok": code == 0,
        "failures": report.get("failuresTotal", report.get("failures_total")),
        "peak_rss_mb": peak_kib / 1024,
    }


@contextmanager
def bench_database(args: argparse.Namespace) -> Iterator[str]:
    """A fresh migrated database: on a Citus cluster started here (``--citus``), or beside the
    configured (or an embedded) server, dropped afterwards unless ``--keep``."""
    if args.citus:
        with citus_cluster() as cluster:
            asyncio.run(migrate(cluster.url()))
            yield cluster.url()
        return
    with database_server(args.database_url) as server_url:
        url = asyncio.run(create_bench_database(server_url, BENCH_DATABASE))
        try:
            yield url
        finally:
            if not args.keep:
                asyncio.run(drop_database(server_url, BENCH_DATABASE))


async def migrate(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await upgrade(connection)
    finally:
        await connection.close()


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    pool = await create_pool(url, size_min=1, size_max=4)
    try:
        started = time.perf_counter()
        events = await write_ledger(pool, args.events)
        write_s = time.perf_counter() - started
        cards = await pool.fetchval("select count(distinct stream_id) from events")
        by_type = {
            r["type"].rsplit(".", 1)[-1]: r["n"]
            for r in await pool.fetch("select type, count(*) as n from events group by type order by type")
        }
        await pool.execute("vacuum analyze events")
        projections = await catch_up(pool, events, args.batch_events_max)
        await pool.execute("vacuum analyze")
    finally:
        await pool.close()
    verified = verify(url, events)
    exported = export(url)
    return {
        "benchmark": "projections_perf",
        "on": "citus: a coordinator and 2 workers" if args.citus else "one server",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": events,
        "cards": cards,
        "events_by_type": by_type,
        "write_s": round(write_s, 1),
        "catch_up_all": projections.pop("all three"),
        "catch_up": projections,
        "verify": verified,
        "export_csv": exported,
    }


def table(figures: dict[str, Any]) -> str:
    def line(what: str, rate: float, unit: str, target: float) -> str:
        """A rate and its target; a higher rate meets it."""
        return f"| {what} | {rate:,.0f} {unit} | {target:,} {unit} | {'met' if rate >= target else 'MISSED'} |"

    lines = ["| measure | result | target | |", "|---|---|---|---|"]
    for name, p in figures["catch_up"].items():
        lines.append(line(f"catch-up {name} ({p['seconds']} s)", p["events_per_s"], "events/s", TARGET_CATCH_UP))
    all_ = figures["catch_up_all"]
    what = f"catch-up all three, one runner ({all_['seconds']} s)"
    lines.append(line(what, all_["events_per_s"], "events/s", TARGET_CATCH_UP))
    v = figures["verify"]
    lines.append(line(f"audit verify ({v['seconds']} s)", v["events_per_s"], "events/s", TARGET_VERIFY))
    x = figures["export_csv"]
    lines.append(line(f"CSV export, {x['rows']:,} rows ({x['seconds']} s)", x["rows_per_s"], "rows/s", TARGET_EXPORT))
    peak = x["peak_rss_mb"]
    lines.append(f"| CSV export peak RSS | {peak:,.0f} MB | < {TARGET_EXPORT_PEAK_MB} MB | {'met' if peak < TARGET_EXPORT_PEAK_MB else 'MISSED'} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.projections_perf", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=EVENTS_DEFAULT, help="events to write (%(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"{EVENTS_QUICK:,} events")
    parser.add_argument("--batch-events-max", type=int, help="the runner's batch size (default: the runner's own)")
    parser.add_argument("--database-url", help="server to use (default: $GIFTCARD_DATABASE_URL or embedded)")
    parser.add_argument("--citus", action="store_true", help="on a loopback Citus cluster (coordinator + 2 workers)")
    parser.add_argument("--keep", action="store_true", help="keep the bench database afterwards")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.events = EVENTS_QUICK
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with bench_database(args) as url:
        figures = asyncio.run(run(url, args))
    print(
        f"{figures['events']:,} events on {figures['cards']:,} cards written in {figures['write_s']} s "
        f"({', '.join(f'{k} {v:,}' for k, v in figures['events_by_type'].items())})"
    )
    if not figures["verify"]["ok"]:
        print(f"warning: verify reported {figures['verify']['failures']} failure(s)")
    print(table(figures))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
