"""Appends per second at 1, 8, 32 and 64 concurrent writers: three contenders, one database.

raw            one asyncpg ``insert`` of one row per autocommit statement into a copy of our
               events table (same columns, same indexes): what PostgreSQL sustains for our row
               shape, so the ceiling.
ours           ``ledger.eventstore.store.EventStore.append`` of one Debited-sized event per call, each writer
               on its own stream, with the right expected version and previous hash.
eventsourcing  the library's stock PostgreSQL application (psycopg, synchronous), one thread per
               writer, each saving one new event of its own small aggregate per ``save``.

At each concurrency level every contender is measured for ``--seconds``, split into
``--rounds`` slices that take turns with the other contenders' slices (each after its own
warm-up); a contender's figure is the median of its slices. Interleaving matters on a shared
machine: a burst of someone else's load then spoils one slice of one contender, not a whole
column. Everything runs on a database created for the run and dropped after it.

    python -m bench.event_store_appends --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from bench.arguments import add_database_url, int_list
from bench.report import write_json
from ledger.eventstore.codec import MsgspecTranscoder
from ledger.eventstore.store import GENESIS_HASH, EventStore, NewEvent
from ledger.postgres.database import EmbeddedPostgres, create_pool, database_named
from ledger.postgres.migrate import upgrade

# Its own name, not the generic giftcard_bench: it is dropped WITH (FORCE), and other
# benchmarks may be running against the same server.
BENCH_DATABASE = "giftcard_bench_appends"
RAW_SCHEMA = "bench_raw"
ES_SCHEMA = "bench_es"
WRITERS = (1, 8, 32, 64)
CONTENDERS = ("raw", "ours", "eventsourcing")
EVENT_TYPE = "giftcard.Debited"
TARGET_VS_RAW = 0.60  # the targets, checked at the highest concurrency measured
TARGET_VS_ES = 3.0


@dataclass(frozen=True)
class Timing:
    warmup: float  # before each slice, unmeasured: connections warm, statements prepared
    slice: float  # measured


@dataclass(frozen=True)
class Result:
    writers: int
    slices: dict[str, list[float]]  # contender -> appends/s of each slice

    def rate(self, contender: str) -> float:
        return statistics.median(self.slices[contender])

    @property
    def ours_vs_raw(self) -> float:
        return self.rate("ours") / self.rate("raw")

    @property
    def ours_vs_eventsourcing(self) -> float:
        return self.rate("ours") / self.rate("eventsourcing")

    def as_dict(self) -> dict[str, Any]:
        return {
            "writers": self.writers,
            "raw_insert_per_s": round(self.rate("raw")),
            "our_append_per_s": round(self.rate("ours")),
            "eventsourcing_per_s": round(self.rate("eventsourcing")),
            "ours_vs_raw_pct": round(100 * self.ours_vs_raw, 1),
            "ours_vs_eventsourcing_x": round(self.ours_vs_eventsourcing, 2),
            "slices_per_s": {name: [round(r) for r in rates] for name, rates in self.slices.items()},
        }


# ---- the event every contender writes -------------------------------------------------------

_canonical = MsgspecTranscoder()  # the ledger's own canonical JSON (sorted keys, msgspec)


def debited_fields() -> dict[str, Any]:
    """A gift card Debited event's fields with fresh ids, as the domain records them."""
    return {
        "date": datetime.now(UTC).isoformat(),
        "description": "Order 1234567890-01",
        "order_info": {"orderId": "1234567890-01", "sequence": "501234"},
        "request_id": str(uuid.uuid4()),
        "transaction_id": uuid.uuid4().hex,
        "value": 592,
    }


def debited_event() -> tuple[bytes, str]:
    """Canonical bytes of a Debited event (about 300 bytes, like the real one) and its request id."""
    fields = debited_fields()
    return _canonical.encode({**fields, "timestamp": fields["date"]}), fields["request_id"]


def request_metadata(request_id: str) -> dict[str, str]:
    return {"actor": "bench", "request_id": request_id}


# ---- measuring --------------------------------------------------------------------------------


async def measure_tasks(steps: list[Callable[[], Awaitable[None]]], timing: Timing) -> float:
    """Runs each step in a loop on its own task; returns completed steps per second after warm-up."""
    counts = [0] * len(steps)
    running = True

    async def loop(i: int, step: Callable[[], Awaitable[None]]) -> None:
        while running:
            await step()
            counts[i] += 1

    tasks = [asyncio.create_task(loop(i, step)) for i, step in enumerate(steps)]
    await asyncio.sleep(timing.warmup)
    done, start = sum(counts), time.perf_counter()
    await asyncio.sleep(timing.slice)
    rate = (sum(counts) - done) / (time.perf_counter() - start)
    running = False
    await asyncio.gather(*tasks)  # also re-raises the first writer's error, if any
    return rate


def measure_threads(steps: list[Callable[[], None]], timing: Timing) -> float:
    """The same as ``measure_tasks`` for synchronous steps, one thread per step."""
    counts = [0] * len(steps)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop(i: int, step: Callable[[], None]) -> None:
        try:
            while not stop.is_set():
                step()
                counts[i] += 1
        except BaseException as e:  # a failed writer must fail the run, not just lower the rate
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(i, step), daemon=True) for i, step in enumerate(steps)]
    for thread in threads:
        thread.start()
    time.sleep(timing.warmup)
    done, start = sum(counts), time.perf_counter()
    time.sleep(timing.slice)
    rate = (sum(counts) - done) / (time.perf_counter() - start)
    stop.set()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return rate


@asynccontextmanager
async def writer_pool(url: str, writers: int) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool with one connection per writer, all opened before the clock starts.

    Sized explicitly: the service's default maximum (20) would make 32 or 64 writers queue for
    a connection, and the benchmark would measure the pool instead of the append.
    """
    pool = await create_pool(url, size_min=writers, size_max=writers)
    try:
        yield pool
    finally:
        await pool.close()


# ---- contender 1: raw single-row INSERT --------------------------------------------------------

_RAW_INSERT = f"""
insert into {RAW_SCHEMA}.events (stream_id, version, type, data, metadata, hash, idempotency_key)
values ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7)
"""
_RAW_HASH = bytes(32)  # the ceiling stores a hash-sized value but computes no chain


def raw_writer(pool: asyncpg.Pool) -> Callable[[], Awaitable[None]]:
    stream_id, version = str(uuid.uuid4()), 0

    async def step() -> None:
        nonlocal version
        data, request_id = debited_event()
        version += 1
        metadata = json.dumps(request_metadata(request_id))
        await pool.execute(
            _RAW_INSERT, stream_id, version, EVENT_TYPE, data.decode(), metadata, _RAW_HASH, f"transaction:{request_id}"
        )

    return step


async def run_raw(url: str, writers: int, timing: Timing) -> float:
    async with writer_pool(url, writers) as pool:
        return await measure_tasks([raw_writer(pool) for _ in range(writers)], timing)


# ---- contender 2: our EventStore.append --------------------------------------------------------


def our_writer(store: EventStore) -> Callable[[], Awaitable[None]]:
    stream_id, version, last_hash = str(uuid.uuid4()), 0, GENESIS_HASH

    async def step() -> None:
        nonlocal version, last_hash
        data, request_id = debited_event()
        last_hash = await store.append(
            stream_id,
            version,
            [NewEvent(EVENT_TYPE, data)],
            previous_hash=last_hash,
            idempotency_key=f"transaction:{request_id}",
            metadata=request_metadata(request_id),
        )
        version += 1

    return step


async def run_ours(url: str, writers: int, timing: Timing) -> float:
    async with writer_pool(url, writers) as pool:
        store = EventStore(pool)
        return await measure_tasks([our_writer(store) for _ in range(writers)], timing)


# ---- contender 3: the eventsourcing library's stock PostgreSQL application -------------------


class BenchCard(Aggregate):
    """The library's own Aggregate, recording Debited events with our Debited's fields."""

    def __init__(self) -> None:
        self.debits = 0

    @event("Debited")
    def debit(
        self, transaction_id: str, value: int, description: str, request_id: str, order_info: dict, date: str
    ) -> None:
        self.debits += 1


class BenchApplication(Application):
    pass


def eventsourcing_env(url: str, writers: int) -> dict[str, str]:
    parts = urlsplit(url)
    # The embedded server is reached through a socket directory given as ?host=... in the URL.
    socket_dir = parse_qs(parts.query).get("host", [None])[0]
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/"),
        "POSTGRES_HOST": socket_dir or parts.hostname or "localhost",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "postgres",
        "POSTGRES_PASSWORD": parts.password or "",
        "POSTGRES_SCHEMA": ES_SCHEMA,
        # One connection per thread, as our side gets: the stock default (5 + 10 overflow) would
        # make threads wait for a connection, which is not what this comparison is about.
        "POSTGRES_POOL_SIZE": str(writers),
        "POSTGRES_MAX_OVERFLOW": "0",
    }


def eventsourcing_writer(app: Application) -> Callable[[], None]:
    card = BenchCard()
    app.save(card)  # the Created event, before the clock starts

    def step() -> None:
        card.debit(**debited_fields())
        app.save(card)

    return step


def run_eventsourcing(url: str, writers: int, timing: Timing) -> float:
    app = BenchApplication(env=eventsourcing_env(url, writers))
    try:
        return measure_threads([eventsourcing_writer(app) for _ in range(writers)], timing)
    finally:
        app.close()


async def run_contender(name: str, url: str, writers: int, timing: Timing) -> float:
    if name == "raw":
        return await run_raw(url, writers, timing)
    if name == "ours":
        return await run_ours(url, writers, timing)
    # The library is synchronous: its threads run off the event loop.
    return await asyncio.to_thread(run_eventsourcing, url, writers, timing)


# ---- the database ------------------------------------------------------------------------------


@contextmanager
def database_server(url: str | None) -> Iterator[str]:
    """The server named by ``url``, or an embedded one in a temporary directory."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="giftcard-bench-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp) / "pgdata")
        try:
            yield embedded.url
        finally:
            embedded.stop()


async def create_migrated_database(server_url: str, name: str) -> str:
    """A fresh database beside the configured one (any left by an earlier run is dropped), migrated:
    where each benchmark that writes through the ledger starts. Answers its URL."""
    url = await recreate_database(server_url, name)
    connection = await asyncpg.connect(url)
    try:
        await upgrade(connection)
    finally:
        await connection.close()
    return url


async def create_bench_database(server_url: str, name: str, without_index: str | None = None) -> str:
    """A fresh migrated database with a scratch schema per contender; ``without_index``, an index of
    events, dropped first (the raw contender's copy then lacks it too)."""
    url = await create_migrated_database(server_url, name)
    connection = await asyncpg.connect(url)
    try:
        if without_index is not None:
            await connection.execute(
                await connection.fetchval("select format('drop index %I', $1::text)", without_index)
            )
        # LIKE ... INCLUDING ALL copies columns, defaults, identity, constraints and indexes (not
        # the immutability triggers, which never fire on insert): the raw contender writes the
        # very row shape our append writes, so the gap between them is the append's own cost.
        await connection.execute(
            f"""
            create schema {RAW_SCHEMA};
            create table {RAW_SCHEMA}.events (like public.events including all);
            -- Our source and seq come from a trigger under the source's lock; the ceiling takes them free.
            alter table {RAW_SCHEMA}.events alter column source set default 0,
                alter column seq add generated always as identity;
            create schema {ES_SCHEMA};
            """
        )
    finally:
        await connection.close()
    return url


async def recreate_database(server_url: str, name: str, *, template: str | None = None) -> str:
    """An empty database of that name, or a copy of ``template`` (any left by an earlier run is
    dropped); answers its URL."""
    await drop_database(server_url, name)
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"create database {name}" + (f" template {template}" if template else ""))
    finally:
        await admin.close()
    return database_named(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"drop database if exists {name} with (force)")
    finally:
        await admin.close()


async def checkpoint(url: str) -> None:
    """Flushes dirty pages before each slice, so that no contender pays for a checkpoint that the
    previous one's writes made due (needs superuser or pg_checkpoint; skipped otherwise)."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("checkpoint")
    except asyncpg.InsufficientPrivilegeError:
        pass
    finally:
        await connection.close()


async def wait_for_connection_slots(url: str, needed: int, timeout: float = 60.0) -> None:
    """Waits until the server can take ``needed`` more connections: on a server shared with other
    work, opening 64 at once can hit max_connections, and a short wait is better than a crash."""
    connection = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            free = await connection.fetchval(
                """
                select current_setting('max_connections')::int
                     - current_setting('superuser_reserved_connections')::int
                     - (select count(*) from pg_stat_activity where backend_type = 'client backend')
                """
            )
            if free > needed:  # > rather than >=: this connection is still counted and about to close
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server has {free} free connections, the next run needs {needed}")
            await asyncio.sleep(1.0)
    finally:
        await connection.close()


async def server_facts(url: str) -> dict[str, str]:
    connection = await asyncpg.connect(url)
    try:
        names = ("server_version", "synchronous_commit", "fsync", "max_connections", "shared_buffers")
        return {name: await connection.fetchval(f"show {name}") for name in names}
    finally:
        await connection.close()


# ---- the run -------------------------------------------------------------------------------------


async def run_level(url: str, writers: int, rounds: int, timing: Timing) -> Result:
    """Every contender's slices at one concurrency level, taking turns."""
    slices: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(rounds):
        for name in CONTENDERS:
            await wait_for_connection_slots(url, writers)
            await checkpoint(url)
            slices[name].append(await run_contender(name, url, writers, timing))
            print(f"  {writers:>3} writers  {name:<14} {slices[name][-1]:>9,.0f}/s", file=sys.stderr, flush=True)
    return Result(writers, slices)


async def run(server_url: str, args: argparse.Namespace) -> tuple[list[Result], dict[str, str]]:
    url = await create_bench_database(server_url, args.bench_database, args.without_index)
    try:
        facts = await server_facts(url)
        timing = Timing(warmup=args.warmup, slice=args.seconds / args.rounds)
        return [await run_level(url, writers, args.rounds, timing) for writers in args.writers], facts
    finally:
        await drop_database(server_url, args.bench_database)


def table(results: list[Result]) -> str:
    lines = [
        "| writers | raw INSERT/s | our append/s | eventsourcing/s | ours/raw % | ours/eventsourcing x |",
        "|--------:|-------------:|-------------:|----------------:|-----------:|---------------------:|",
    ]
    for r in results:
        lines.append(
            f"| {r.writers} | {r.rate('raw'):,.0f} | {r.rate('ours'):,.0f} | {r.rate('eventsourcing'):,.0f} "
            f"| {100 * r.ours_vs_raw:.1f} % | {r.ours_vs_eventsourcing:.2f} x |"
        )
    return "\n".join(lines)


def targets(results: list[Result]) -> dict[str, Any]:
    top = max(results, key=lambda r: r.writers)
    return {
        "writers": top.writers,
        "ours_vs_raw_min": TARGET_VS_RAW,
        "ours_vs_raw_met": top.ours_vs_raw >= TARGET_VS_RAW,
        "ours_vs_eventsourcing_min": TARGET_VS_ES,
        "ours_vs_eventsourcing_met": top.ours_vs_eventsourcing >= TARGET_VS_ES,
    }


def report(args: argparse.Namespace, results: list[Result], facts: dict[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": "event_store_appends",
        "command": shlex.join(["python", "-m", "bench.event_store_appends", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "cpus": os.cpu_count(),
        "server": facts,
        "event_bytes": len(debited_event()[0]),
        "without_index": args.without_index,
        "results": [r.as_dict() for r in results],
        "targets": targets(results),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_database_url(parser, "a PostgreSQL server to run on (any database of it: the benchmark creates its own)")
    parser.add_argument("--bench-database", default=BENCH_DATABASE, help="dropped and recreated (%(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="measured time per contender and level (%(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="slices --seconds is split into (%(default)s)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured time before each slice (%(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s in one slice, 0.3 s warm-up")
    parser.add_argument(
        "--writers",
        type=int_list,
        default=list(WRITERS),
        help="comma-separated concurrency levels (default 1,8,32,64)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure and ratio here")
    parser.add_argument(
        "--without-index",
        metavar="NAME",
        help="drop this index of events after migrating: what it costs the writers, against a run without "
        "this option (alternate the two runs on a shared machine)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds, args.warmup = 1.0, 1, 0.3
    return args


def busy_cores(seconds: float = 2.0) -> float | None:
    """How many CPUs the machine keeps busy, sampled from /proc/stat (Linux; None elsewhere)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:9]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    try:
        idle0, all0 = sample()
        time.sleep(seconds)
        idle1, all1 = sample()
    except OSError:
        return None
    return round((1 - (idle1 - idle0) / (all1 - all0)) * (os.cpu_count() or 1), 2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before starting, how busy other work keeps the machine: client and server share its CPUs,
    # so a figure measured beside someone else's load is lower, and the JSON should say so.
    before = {"busy_cores_before": busy_cores(), "loadavg_1min_before": round(os.getloadavg()[0], 2)}
    with database_server(args.database_url) as server_url:
        results, facts = asyncio.run(run(server_url, args))
    facts = {**facts, **before, "loadavg_1min_after": round(os.getloadavg()[0], 2)}
    figures = report(args, results, facts)
    print(table(results))
    if (before["busy_cores_before"] or 0) > 0.25:
        print(f"\nnote: {before['busy_cores_before']} CPUs were busy with other work before the run")
    met = figures["targets"]
    print(
        f"\nat {met['writers']} writers: ours/raw >= {TARGET_VS_RAW:.0%} "
        f"{'met' if met['ours_vs_raw_met'] else 'MISSED'}; ours/eventsourcing >= {TARGET_VS_ES:g}x "
        f"{'met' if met['ours_vs_eventsourcing_met'] else 'MISSED'}"
    )
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
