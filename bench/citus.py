"""The ledger on a Citus cluster beside one PostgreSQL server, and a shard moved under load.

Per round, two fresh databases of the same PostgreSQL 15 binaries and settings (tests/pg_cluster.py,
fsync off on both): one server, and a Citus coordinator with two workers on the same machine
(tests/citus_cluster.py; three servers share its two cores). Each gets ``giftcard serve`` with
1,000 cards it created itself, then wrk posts Debits of 0.01 to them round-robin at 64
connections (the setting of bench/http_debits.py). Both run as ``serve`` runs by default, the
projection runner following every source (ledger.eventstore.commit_order) beside the web workers. The servers
take turns; each row is the median round.

Last, on a cluster under the same load, one shard (and the shards co-located with it) moves to
the other worker online, and its time is reported.

    python -m bench.citus --rounds 3

Targets: the cluster keeps at least half of one server's Debits/s on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg

from bench.http_debits import (
    CARDS,
    CHECKOUT_BODY,
    CheckoutBody,
    Credentials,
    cell_of,
    ours,
    run_wrk,
    running,
    seed_ours,
    write_lua_script,
)
from tests.citus_cluster import CitusCluster, citus_missing
from tests.pg_cluster import PgNode, owned_folder

DATABASE = "giftcard"
CONNECTIONS = 64
TARGET_SHARE = 0.5
WRK_THREADS = 2


@contextmanager
def one_server() -> Iterator[str]:
    folder = owned_folder("giftcard-bench-one-")
    node = PgNode(folder, "single")
    try:
        node.initdb(port=str(node.port))
        node.start()
        node.sql(f"create database {DATABASE}")
        yield node.url(DATABASE)
    finally:
        node.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def citus_cluster() -> Iterator[CitusCluster]:
    cluster = CitusCluster(DATABASE)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def measure(name: str, url: str, args: argparse.Namespace, work: Path, credentials: Credentials) -> dict:
    server = ours(name, DATABASE, credentials, extra_env=[])
    with running(server, url, work) as (_, base_url):
        cards = asyncio.run(seed_ours(base_url, [credentials]))
        script = write_lua_script(work, cards, [credentials], server.route, CheckoutBody.read(CHECKOUT_BODY))
        run_wrk(base_url, script, CONNECTIONS, args.warmup, f"warm-{name}", WRK_THREADS)
        cell = cell_of(name, CONNECTIONS, run_wrk(base_url, script, CONNECTIONS, args.seconds, name, WRK_THREADS))
    print(f"  {name:<8} {cell.requests_per_s:>8,.0f} req/s  p99 {cell.p99_ms:7.2f} ms  non-2xx {cell.non_2xx}")
    return {"requests_per_s": cell.requests_per_s, "p99_ms": cell.p99_ms, "non_2xx": cell.non_2xx}


def move_one_shard_under_load(args: argparse.Namespace, work: Path, credentials: Credentials) -> float:
    """Seconds ``citus_move_shard_placement`` took while wrk posted Debits to the cluster."""
    with citus_cluster() as cluster:
        server = ours("citus", DATABASE, credentials, extra_env=[])
        with running(server, cluster.url(), work) as (_, base_url):
            cards = asyncio.run(seed_ours(base_url, [credentials]))
            script = write_lua_script(work, cards, [credentials], server.route, CheckoutBody.read(CHECKOUT_BODY))
            load = threading.Thread(
                target=run_wrk, args=(base_url, script, CONNECTIONS, args.seconds + 10, "move", WRK_THREADS)
            )
            load.start()
            time.sleep(3)
            took = asyncio.run(move_a_shard(cluster))
            load.join()
    return took


async def move_a_shard(cluster: CitusCluster) -> float:
    connection = await asyncpg.connect(cluster.url())
    try:
        await connection.execute("set statement_timeout = 0")
        shard = await connection.fetchrow(
            "select shardid, nodeport from citus_shards where table_name = 'events'::regclass order by shardid limit 1"
        )
        target = next(worker.port for worker in cluster.workers if worker.port != shard["nodeport"])
        started = time.monotonic()
        await connection.execute(
            "select citus_move_shard_placement($1, '127.0.0.1', $2, '127.0.0.1', $3, 'force_logical')",
            shard["shardid"],
            shard["nodeport"],
            target,
        )
        return time.monotonic() - started
    finally:
        await connection.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the two setups taking turns (%(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured wrk run (%(default)s s)")
    parser.add_argument("--warmup", type=float, default=5.0, help="wrk warm-up (%(default)s s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    missing = citus_missing()
    if missing:
        print(f"skipped: {missing}", file=sys.stderr)
        return 2
    args = parse_args(argv)
    credentials = Credentials.generated()
    work = Path(tempfile.mkdtemp(prefix="giftcard-bench-citus-"))  # wrk scripts and server logs, kept for reading
    rounds: dict[str, list[dict]] = {"one": [], "citus": []}
    for n in range(1, args.rounds + 1):
        print(f"round {n} ({CARDS} cards, {CONNECTIONS} connections, {args.seconds:g} s)")
        with one_server() as url:
            rounds["one"].append(measure("one", url, args, work, credentials))
        with citus_cluster() as cluster:
            rounds["citus"].append(measure("citus", cluster.url(), args, work, credentials))
    median = {name: statistics.median(r["requests_per_s"] for r in found) for name, found in rounds.items()}
    p99 = {name: statistics.median(r["p99_ms"] for r in found) for name, found in rounds.items()}
    share = median["citus"] / median["one"]
    moved_s = move_one_shard_under_load(args, work, credentials)
    print(
        f"median: one server {median['one']:,.0f} req/s (p99 {p99['one']:.1f} ms); "
        f"cluster {median['citus']:,.0f} req/s (p99 {p99['citus']:.1f} ms): {share:.0%} of one server "
        f"(target {TARGET_SHARE:.0%})\nshard move under load: {moved_s:.2f} s"
    )
    return 0 if share >= TARGET_SHARE else 1


if __name__ == "__main__":
    sys.exit(main())
