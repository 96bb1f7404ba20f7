"""A delivery round of many stores' webhook subscriptions: its time, and the events PostgreSQL reads for it.

Each of ``--stores`` stores (tenants) has one subscription and ``--events-per-store`` events, written
one store after another, so that a store's events are followed by every later store's (the quiet
stores of issue 23). The deliverer (hub.webhooks.delivery's ``run_once``, as the service's database
role, so under row-level security) then runs two rounds:

catch-up   every subscription reads its store's events, from where it was created
quiet      nothing new: every subscription the deliverer finds due polls once

Two contenders, each on a database of its own built the same way, take turns; the subscriptions'
checkpoints are put back before each turn:

tenant     as shipped: the reads name the store, and find its rows by events_by_tenant (migration 0021)
scan       as before migration 0021: that index dropped before any event was written, and the reads
           naming no store (``one_tenant_in_scope`` answering None), row-level security dropping the
           other stores' rows

A round's figures: its time, and the events table's counters (pg_stat_user_tables: rows read by
sequential scans and fetched by index scans; pg_statio_user_tables: blocks), read after the round's
connections have closed, since a backend flushes its counters when it exits. Then the writers' side:
turns of new events appended on each database, their time and WAL bytes per event.

    python -m bench.webhook_reads --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.arguments import add_database_url
from bench.event_store_appends import create_migrated_database, database_server, drop_database
from bench.report import write_json
from hub.providers.egress import EgressPolicy
from hub.webhooks.delivery import Deliverer, DeliveryOptions, delivery_client
from hub.webhooks.subscriptions import create_subscription
from ledger.eventstore import store as event_store
from ledger.eventstore.store import EventStore, NewEvent, StreamAppend
from ledger.postgres.credentials_cipher import CredentialsCipher
from ledger.postgres.database import create_pool
from ledger.postgres.migrate import grant_service_role
from ledger.postgres.tenancy import ALL_TENANTS, tenant_scope

BENCH_DATABASE = "giftcard_bench_webhook_reads"
SERVICE_ROLE = "giftcard_bench_webhooks"
CONTENDERS = ("tenant", "scan")
ROUNDS = ("catch-up", "quiet")
# What the index costs the writers: new events of every store, in appends of APPENDS_PER_WRITE (as a
# group commit of that many Debits), with the index (tenant) and without it (scan).
WRITES = "writes"
APPENDS_PER_WRITE = 100
INDEX = "events_by_tenant"
# Never contacted: the bench's events are of no public type, so every one is filtered out, not POSTed.
RECEIVER_URL = "http://127.0.0.1:9/hook"
POLICY = EgressPolicy(("127.0.0.0/8",))
CIPHER = CredentialsCipher(os.urandom(32).hex())
APPENDS_PER_STATEMENT_MAX = 1000
NOTED = NewEvent("bench.Noted", b"{}")  # of no public type: a subscription filters it out

_ROLE_CONNECTED = "select count(*) from pg_stat_activity where usename = $1 and datname = current_database()"
_EVENTS_READ = """
select t.seq_tup_read + coalesce(t.idx_tup_fetch, 0) as rows,
       io.heap_blks_hit + io.heap_blks_read + coalesce(io.idx_blks_hit + io.idx_blks_read, 0) as blocks
from pg_stat_user_tables t join pg_statio_user_tables io using (relid)
where t.relname = 'events'
"""


def store_name(n: int) -> str:
    return f"store-{n:03d}"


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


def as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{role}@{host}", parts.path, parts.query, parts.fragment))


# ---- the data ------------------------------------------------------------------------------------


async def prepare(url: str, contender: str, stores: int, events_per_store: int) -> str:
    """The stores, their subscriptions (made first: each starts before every event) and their events;
    answers the service role's URL."""
    async with connected(url) as admin:
        if contender == "scan":
            await admin.execute(f"drop index {INDEX}")
        await grant_service_role(admin, SERVICE_ROLE)
        await admin.executemany("insert into tenants (account) values ($1)", [(store_name(n),) for n in range(stores)])
    role_url = as_role(url, SERVICE_ROLE)
    pool = await create_pool(role_url, size_min=1, size_max=2)
    try:
        for n in range(stores):
            with tenant_scope(store_name(n)):
                await create_subscription(pool, CIPHER, POLICY, url=RECEIVER_URL, event_types=None)
        for n in range(stores):
            with tenant_scope(store_name(n)):
                await append_events(EventStore(pool), store_name(n), events_per_store)
    finally:
        await pool.close()
    async with connected(url) as admin:
        await admin.execute("vacuum analyze events")
    return role_url


async def append_events(store: EventStore, name: str, count: int) -> None:
    for first in range(0, count, APPENDS_PER_STATEMENT_MAX):
        last = min(count, first + APPENDS_PER_STATEMENT_MAX)
        await store.append_many([StreamAppend(f"{name}-{n}", 0, [NOTED]) for n in range(first, last)])


# ---- a round -------------------------------------------------------------------------------------


@contextmanager
def reads_as(contender: str) -> Iterator[None]:
    """``scan``: the deliverer's reads name no store, as before migration 0021."""
    if contender == "tenant":
        yield
        return
    shipped = event_store.one_tenant_in_scope
    event_store.one_tenant_in_scope = lambda: None
    try:
        yield
    finally:
        event_store.one_tenant_in_scope = shipped


async def restart_subscriptions(url: str) -> None:
    async with connected(url) as admin:
        await admin.execute("update webhook_subscriptions set checkpoint = '{}', delivered = 0, attempts = 0")


async def events_read(url: str) -> tuple[int, int]:
    """(rows, blocks) of events read so far, once every connection of the service role has closed."""
    async with connected(url) as admin:
        deadline = time.monotonic() + 10
        while await admin.fetchval(_ROLE_CONNECTED, SERVICE_ROLE):
            if time.monotonic() > deadline:
                raise TimeoutError("the service role's connections did not close")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # an exiting backend flushes its counters as it goes
        row = await admin.fetchrow(_EVENTS_READ)
    return row["rows"], row["blocks"]


async def one_round(url: str, role_url: str) -> dict[str, float]:
    before = await events_read(url)
    pool = await create_pool(role_url, size_min=1, size_max=2)
    options = DeliveryOptions()
    try:
        with tenant_scope(ALL_TENANTS):  # as the deliverer runs in serve
            async with delivery_client(POLICY) as client:
                deliverer = Deliverer(pool, client, CIPHER, options)
                started = time.perf_counter()
                handled = await deliverer.run_once()
                elapsed = time.perf_counter() - started
    finally:
        await pool.close()
    after = await events_read(url)
    return {"seconds": elapsed, "events_handled": handled, "rows": after[0] - before[0], "blocks": after[1] - before[1]}


async def appends(url: str, role_url: str, stores: int, count: int) -> dict[str, float]:
    """``count`` new events, round robin over the stores, one store's share of each write in its scope
    (its own statement); the time and the WAL they took."""
    pool = await create_pool(role_url, size_min=1, size_max=2)
    store = EventStore(pool)
    async with connected(url) as admin:
        wal_before = await admin.fetchval("select pg_current_wal_lsn()")
        started = time.perf_counter()
        try:
            for first in range(0, count, APPENDS_PER_WRITE):
                name = store_name(first // APPENDS_PER_WRITE % stores)
                with tenant_scope(name):
                    batch = range(first, min(count, first + APPENDS_PER_WRITE))
                    await store.append_many([StreamAppend(f"{name}-w{uuid.uuid4().hex}", 0, [NOTED]) for _ in batch])
        finally:
            await pool.close()
        elapsed = time.perf_counter() - started
        wal_bytes = await admin.fetchval("select pg_current_wal_lsn() - $1::pg_lsn", wal_before)
    return {"seconds": elapsed, "events": count, "wal_bytes_per_event": float(wal_bytes) / count}


async def run(server_url: str, args: argparse.Namespace) -> dict[str, dict[str, list[dict[str, float]]]]:
    figures: dict[str, dict[str, list[dict[str, float]]]] = {c: {r: [] for r in (*ROUNDS, WRITES)} for c in CONTENDERS}
    names = {contender: f"{args.bench_database}_{contender}" for contender in CONTENDERS}
    try:
        async with connected(server_url) as admin:
            await admin.execute(f"drop role if exists {SERVICE_ROLE}")
            await admin.execute(f"create role {SERVICE_ROLE} login")
        urls = {c: await create_migrated_database(server_url, name) for c, name in names.items()}
        role_urls = {c: await prepare(urls[c], c, args.stores, args.events_per_store) for c in CONTENDERS}
        for _ in range(args.repeats):
            for contender in CONTENDERS:
                await restart_subscriptions(urls[contender])
                with reads_as(contender):
                    for name in ROUNDS:
                        found = await one_round(urls[contender], role_urls[contender])
                        figures[contender][name].append(found)
                        print(f"  {contender:<7} {name:<9} {found}", file=sys.stderr, flush=True)
        for _ in range(args.repeats):
            for contender in CONTENDERS:
                found = await appends(urls[contender], role_urls[contender], args.stores, args.write_events)
                figures[contender][WRITES].append(found)
                print(f"  {contender:<7} {WRITES:<9} {found}", file=sys.stderr, flush=True)
    finally:
        for name in names.values():
            await drop_database(server_url, name)
        async with connected(server_url) as admin:
            await admin.execute(f"drop role if exists {SERVICE_ROLE}")
    return figures


def table(figures: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    lines = [
        "| reads | round | events handled | time (median) | rows of events read | blocks of events read |",
        "|-------|-------|---------------:|--------------:|--------------------:|----------------------:|",
    ]
    for contender in CONTENDERS:
        for name in ROUNDS:
            runs = figures[contender][name]
            lines.append(
                f"| {contender} | {name} | {runs[0]['events_handled']:,} "
                f"| {statistics.median(r['seconds'] for r in runs) * 1000:,.0f} ms "
                f"| {statistics.median(r['rows'] for r in runs):,.0f} | {statistics.median(r['blocks'] for r in runs):,.0f} |"
            )
    lines += [
        "",
        "| index | events written | time (median) | WAL bytes per event (median) |",
        "|-------|---------------:|--------------:|-----------------------------:|",
    ]
    for contender in CONTENDERS:
        runs = figures[contender][WRITES]
        lines.append(
            f"| {'with' if contender == 'tenant' else 'without'} {INDEX} | {runs[0]['events']:,} "
            f"| {statistics.median(r['seconds'] for r in runs) * 1000:,.0f} ms "
            f"| {statistics.median(r['wal_bytes_per_event'] for r in runs):,.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_database_url(parser, "a PostgreSQL server to run on (any database of it: the benchmark creates its own)")
    parser.add_argument(
        "--bench-database",
        default=BENCH_DATABASE,
        help="prefix of its two databases, dropped and recreated (%(default)s)",
    )
    parser.add_argument("--stores", type=int, default=100, help="stores, each with one subscription (%(default)s)")
    parser.add_argument("--events-per-store", type=int, default=200, help="(%(default)s)")
    parser.add_argument("--write-events", type=int, default=5000, help="events per write turn (%(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="turns of each contender (%(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loadavg_before = round(os.getloadavg()[0], 2)
    with database_server(args.database_url) as server_url:
        figures = asyncio.run(run(server_url, args))
    print(table(figures))
    write_json(
        args.json,
        {
            "benchmark": "webhook_reads",
            "command": shlex.join(["python", "-m", "bench.webhook_reads", *sys.argv[1:]]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "stores": args.stores,
            "events_per_store": args.events_per_store,
            "cpus": os.cpu_count(),
            "loadavg_1min_before": loadavg_before,
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
            "figures": figures,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
