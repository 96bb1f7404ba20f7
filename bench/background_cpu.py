"""The background process's CPU per Debit, in isolation: one code version against another.

``giftcard serve``'s background process applies every event to the read models and delivers the
webhooks, and on a small machine it takes as much CPU per Debit as half the web worker does. The
HTTP benchmark cannot show a change of 10 % of it through its noise; this measures only that.

A database is filled once: the working tree's web worker (as ``bench.debit_cpu`` runs it, no
background) seeds 1,000 cards, a webhook subscription to every Debit (to the benchmark's sink, in a
process of its own) and ``--debits`` checkout Debits (``../shared/bench/debit-body.json``). Then,
for each code version in turn, a copy of it (``CREATE DATABASE ... TEMPLATE``) is handed to the
background process of that version: the read models' runner and the webhook deliverer, on
asyncio, started as serve starts them, from the version's tree. Its CPU (every thread, from /proc)
is counted from the moment its pools are open until every read model has applied every event
and the sink has received every Debit; the figure is that CPU divided by the Debits. The backlog
is applied in full batches, so a batch's fixed price weighs less than under a steady trickle:
the figure is the per-event part.

``--baseline-rev REV`` runs the code of a git revision beside the working tree's (``git archive``,
as ``bench.debit_cpu`` does); the result is the median of the repeats' ratios.

    python -m bench.background_cpu --database-url postgresql://postgres@127.0.0.1:5432/postgres --baseline-rev main
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.debit_cpu import (
    REPO,
    Client,
    Load,
    Version,
    backends_cpu_ns,
    baseline_tree,
    check_serves_tree,
    cpu_ns,
    paired_arguments,
    paired_ratios,
    ratio_line,
    running_server,
    say,
    serve_env,
    stop,
    tree_script,
)
from bench.event_store_appends import database_server, drop_database, recreate_database
from bench.http_debits import CheckoutBody, Credentials, subscribe
from bench.report import write_json
from bench.webhook_sink import running_sink

DATABASE_PREFIX = "giftcard_background_cpu"
CONNECTIONS = 16
CAUGHT_UP_TIMEOUT_S = 600.0
POLL_S = 0.05

# serve's background process (hub/cli/projections.py run_beside_serve) without its start-up checks:
# it says "ready" with its pools open, and starts when told, so that the CPU counted is the work's.
BACKGROUND_SCRIPT = tree_script(
    """
import asyncio
from hub.config import Settings
from hub.webhooks import create_delivery_pool, run_deliveries
from ledger.postgres.database import create_pool
from ledger.postgres.tenancy import ALL_TENANTS, tenant_scope
from projections import read_models
from projections.runner import ProjectionRunner

async def main(url):
    settings = Settings.from_env()
    pool = await create_pool(url, size_min=1, size_max=4, session_state=False)
    webhook_pool = await create_delivery_pool(url)
    with tenant_scope(ALL_TENANTS):
        print("ready", flush=True)
        sys.stdin.readline()
        runner = ProjectionRunner(pool, read_models(settings.native_provider_id))
        await asyncio.gather(runner.run_forever(), run_deliveries(webhook_pool, settings, asyncio.Event()))

asyncio.run(main(sys.argv[1]))
""",
    log_level="WARNING",
)


@dataclass
class Run:
    name: str
    tree: Path
    samples_us: list[float] = field(default_factory=list)  # the background's CPU per Debit, one per run
    database_us: list[float] = field(default_factory=list)  # its PostgreSQL backends' CPU per Debit

    @property
    def least_us(self) -> float:
        return min(self.samples_us)


def fill(
    server_url: str, credentials: Credentials, body: CheckoutBody, sink_url: str, args: argparse.Namespace, work: Path
) -> str:
    """The template database: cards, a subscription to every Debit, and ``args.debits`` Debits."""
    version = Version("fill", REPO, f"{DATABASE_PREFIX}_template")
    with running_server(version, server_url, credentials, work, keep_database=True):
        asyncio.run(subscribe(f"http://127.0.0.1:{version.port}", [credentials], sink_url))
        client = Client(credentials, body)
        try:
            statuses = client.run(Load(version.port, version.cards, args.debits, CONNECTIONS, f"fill-{time.time_ns()}"))
        finally:
            client.close()
    if set(statuses) != {200}:
        raise RuntimeError(f"filling: answers other than 200: {statuses}")
    say(f"filled {version.database}: {args.debits} Debits on {len(version.cards)} cards")
    return version.database


# Events some read model has still to apply.
_LAG = """
select count(*) from projection_checkpoints c, events e
where e.seq > coalesce((c.checkpoint::jsonb ->> e.source::text)::bigint, 0)
"""


def measure(
    run: Run, server_url: str, template: str, credentials: Credentials, sink: Any, args: argparse.Namespace, work: Path
) -> None:
    database = f"{DATABASE_PREFIX}_run"
    url = asyncio.run(recreate_database(server_url, database, template=template))
    env = {**os.environ, **serve_env(credentials), "GIFTCARD_DATABASE_URL": url, "PYTHONPATH": str(run.tree)}
    log_path = work / f"{run.name.split()[0]}-background.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", BACKGROUND_SCRIPT, url],
            env=env,
            cwd=run.tree,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    try:
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"{run.name}: the background process did not start (see {log_path})")
        check_serves_tree(log_path, run.tree)
        try:
            spent_ns, backends_ns = asyncio.run(caught_up_cost(process, database, url, sink, args.debits))
        except RuntimeError as e:
            raise RuntimeError(f"{run.name}: {e} (see {log_path})") from e
    finally:
        stop(process)
        asyncio.run(drop_database(server_url, database))
    run.samples_us.append(spent_ns / 1000 / args.debits)
    run.database_us.append(backends_ns / 1000 / args.debits)


async def caught_up_cost(process: subprocess.Popen, database: str, url: str, sink: Any, debits: int) -> tuple[int, int]:
    """The background process's CPU and its database's backends' CPU (ns) from "go" until every read
    model has applied every event and the sink has every Debit. One connection watches, kept open,
    its backend left out of the count."""
    watcher = await asyncpg.connect(url)
    try:
        watcher_pid = watcher.get_server_pid()
        delivered_before = sink.deliveries
        before, backends_before = cpu_ns(process.pid), backends_cpu_ns(database)
        process.stdin.write(b"go\n")
        process.stdin.flush()
        deadline = time.monotonic() + CAUGHT_UP_TIMEOUT_S
        while sink.deliveries - delivered_before < debits or await watcher.fetchval(_LAG) > 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the background process did not catch up")
            await asyncio.sleep(POLL_S)
        spent_ns = cpu_ns(process.pid) - before
        backends_after = backends_cpu_ns(database)
    finally:
        await watcher.close()
    backends_after.pop(watcher_pid, None)
    return spent_ns, sum(ns - backends_before.get(pid, 0) for pid, ns in backends_after.items())


def describe(run: Run) -> str:
    samples = " ".join(f"{s:.0f}" for s in run.samples_us)
    return (
        f"{run.name:<9} least {run.least_us:6.1f} µs/Debit  median {statistics.median(run.samples_us):6.1f}"
        f"  (every run: {samples}); PostgreSQL's backends median {statistics.median(run.database_us):.0f} µs/Debit"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    credentials = Credentials.generated()
    body = CheckoutBody.read(args.body)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="giftcard-background-cpu-")))
        server_url = stack.enter_context(database_server(args.database_url))
        sink = stack.enter_context(running_sink())
        template = fill(server_url, credentials, body, sink.url, args, work)
        stack.callback(lambda: asyncio.run(drop_database(server_url, template)))
        runs = [Run("current", REPO)]
        if args.baseline_rev:
            runs.append(
                Run(f"baseline ({args.baseline_rev})", stack.enter_context(baseline_tree(args.baseline_rev, work)))
            )
        for repeat in range(args.repeats):
            for one in runs if repeat % 2 == 0 else runs[::-1]:
                measure(one, server_url, template, credentials, sink, args, work)
                say(
                    f"  run {repeat + 1}: {one.name:<9} {one.samples_us[-1]:6.1f} µs/Debit, PostgreSQL {one.database_us[-1]:.0f} µs/Debit"
                )
        say("")
        for one in runs:
            say(describe(one))
        if len(runs) == 2:
            say(ratio_line(*runs))
        return {
            "debits": args.debits,
            "load_average": os.getloadavg(),
            "versions": {r.name: {"samples_us": r.samples_us, "database_us": r.database_us} for r in runs},
            "paired_ratios": paired_ratios(*runs) if len(runs) == 2 else None,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = paired_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--debits", type=int, default=10_000, help="Debits in the backlog (default 10,000)")
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per version (default 5)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    write_json(args.json, run(args))  # only with --json
    return 0


if __name__ == "__main__":
    sys.exit(main())
