"""``giftcard projections run | status | rebuild NAME``.

Thin calls into ``projections`` (the runner, checkpoints, rebuild). ``run_beside_serve`` is the
runner process ``giftcard serve`` starts next to its web workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from tqdm import tqdm

from hub.cli import arguments
from hub.cli.progress import progress_bar
from hub.config import Settings
from hub.webhooks import create_delivery_pool, run_deliveries
from ledger.postgres.database import DATABASE_ERRORS, create_pool, with_database
from ledger.postgres.migrate import upgrade
from ledger.postgres.tenancy import ALL_TENANTS, tenant_scope
from projections import checkpoints, names, read_model, read_models
from projections.checkpoints import ProjectionStatus
from projections.rebuild import RebuildInProgress, count_events, rebuild
from projections.runner import BATCH_EVENTS_MAX, POLL_INTERVAL_S, ROUND_INTERVAL_S, ProjectionRunner

log = logging.getLogger(__name__)
# How long the background process waits before it tries again to reach the database at its start.
START_RETRY_S = 1.0
T = TypeVar("T")


INTERVAL_S_MAX = 60.0  # a runner that waits longer between rounds lets its read models go stale


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Adds the ``projections`` command group."""
    group = commands.add_parser("projections", help="read models: run the projection runner, status, rebuild")
    sub = group.add_subparsers(dest="projections_command", required=True)

    run = sub.add_parser("run", help="keep every read model current (also runs inside serve by default)")
    run.add_argument("--once", action="store_true", help="catch up, then exit")
    _batch_option(run)
    run.add_argument(
        "--poll-interval-s",
        type=arguments.bounded_float(0.0, INTERVAL_S_MAX),
        default=POLL_INTERVAL_S,
        help=f"wait when caught up (default {POLL_INTERVAL_S})",
    )
    run.add_argument(
        "--round-interval-s",
        type=arguments.bounded_float(0.0, INTERVAL_S_MAX),
        default=ROUND_INTERVAL_S,
        help=f"under steady load, start a round at most this often, so that batches are larger (default {ROUND_INTERVAL_S})",
    )
    run.set_defaults(run=run_command)

    status = sub.add_parser("status", help="each projection's position and lag")
    status.add_argument("--json", action="store_true", help="one JSON object per projection")
    status.add_argument(
        "--max-lag-s",
        type=float,
        metavar="SECONDS",
        help="exit 1 when a projection's oldest unapplied event has waited longer (a healthcheck)",
    )
    status.set_defaults(run=status_command)

    again = sub.add_parser("rebuild", help="rebuild one read model from zero while the service keeps running")
    again.add_argument("name", choices=names(), help="the projection to rebuild")
    _batch_option(again)
    again.set_defaults(run=rebuild_command)


def _batch_option(parser: argparse.ArgumentParser) -> None:
    arguments.add_batch_size(parser, "--batch-events-max", BATCH_EVENTS_MAX, "events per transaction")


# ---- commands ------------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    def runner(pool: asyncpg.Pool, on_batch: Callable[[str, int], None]) -> ProjectionRunner:
        return ProjectionRunner(
            pool,
            read_models(args.settings.native_provider_id),
            batch_events_max=args.batch_events_max,
            poll_interval_s=args.poll_interval_s,
            round_interval_s=args.round_interval_s,
            on_batch=on_batch,
        )

    async def work(pool: asyncpg.Pool) -> None:
        if not args.once:
            await _until_signalled(runner(pool, _log_batch).run_forever())
            return
        async with progress_bar(pool, "projections", _events_behind) as bar:
            applied = await runner(pool, lambda name, count: (_log_batch(name, count), bar.update(count))).catch_up()
        print(f"caught up: {applied} event(s) applied")

    with_database(work, args.settings.database)
    return 0


def _log_batch(name: str, count: int) -> None:
    log.info("projection %s applied %d event(s)", name, count)


def run_beside_serve(database_url: str, settings: Settings, serve_pid: int) -> None:
    """The background work that ``giftcard serve`` runs in a process of its own: the projection
    runner and the webhook deliveries (each as its setting says), until SIGTERM or SIGINT or until
    ``serve_pid`` is gone (killed outright, it could not stop its children).

    Not in the web process: applying a batch is seconds of Python work a minute under load, and a
    delivery per Debit is a tenth of a web process's CPU; in the event loop every request waiting
    behind them would pay for it. Here the kernel gives them the other core, and one process serves
    however many web workers there are.
    """

    async def work() -> None:
        pool, webhook_pool = await _pools_once_reachable(database_url, settings)
        try:
            with tenant_scope(ALL_TENANTS):  # one process for every store's read models and webhooks
                jobs = []
                if settings.run_projections:
                    jobs.append(ProjectionRunner(pool, read_models(settings.native_provider_id)).run_forever())
                if webhook_pool is not None:
                    jobs.append(run_deliveries(webhook_pool, settings, asyncio.Event()))
                await _all_of(jobs)
        finally:
            if webhook_pool is not None:
                await webhook_pool.close()
            await pool.close()

    # asyncio's own loop, not uvloop as the web workers: on a slower machine, with uvloop here, Debits
    # on a Citus cluster with two web workers waited past their deadline (test_faults' several hub
    # processes; on a faster one it passed 4 times of 4, cause unknown), and the HTTP bench showed no
    # gain from it, this process running niced (docs/benchmarks.md, "What row-level security cost").
    asyncio.run(_until_signalled(_while_alive(serve_pid, work())))


async def _pools_once_reachable(database_url: str, settings: Settings) -> tuple[asyncpg.Pool, asyncpg.Pool | None]:
    """The background process's pools, the schema checked; retried while the database cannot be
    reached (serve may start during a failover, or just before one: its web workers ride it out,
    and so must this process, which nothing would start again)."""
    while True:
        pools: list[asyncpg.Pool] = []
        try:
            # The runner and the migrations leave no session state (their locks and settings are the
            # transaction's), so a release skips asyncpg's reset: a round trip per batch and read.
            pools.append(await create_pool(database_url, size_min=1, size_max=4, session_state=False))
            if settings.run_webhooks:
                pools.append(await create_delivery_pool(database_url))
            with tenant_scope(ALL_TENANTS):
                async with pools[0].acquire() as connection:
                    await upgrade(connection, default_tenant=settings.default_tenant)
            return pools[0], (pools[1] if settings.run_webhooks else None)
        except DATABASE_ERRORS as e:
            for pool in pools:
                pool.terminate()
            log.warning(
                "projections and webhooks cannot reach the database (%r); trying again in %g s", e, START_RETRY_S
            )
            await asyncio.sleep(START_RETRY_S)


def status_command(args: argparse.Namespace) -> int:
    found = with_database(checkpoints.statuses, args.settings.database)
    if args.json:
        for status in found:
            print(json.dumps(_status_json(status)))
    else:
        _print_status_table(found)
    behind = [s for s in found if args.max_lag_s is not None and s.lag_s > args.max_lag_s]
    for status in behind:
        print(f"{status.name} is {status.lag_s:.1f} s behind (more than {args.max_lag_s:g} s)", file=sys.stderr)
    return 1 if behind else 0


def _print_status_table(found: list[ProjectionStatus]) -> None:
    print(f"{'projection':<20} {'applied':>9} {'lag events':>11} {'lag s':>8}  {'last event':<19}  place (source:seq)")
    for status in found:
        last = "-" if status.last_event_at is None else f"{status.last_event_at:%Y-%m-%d %H:%M:%S}"
        note = "  (rebuilding)" if status.rebuilding else ""
        print(
            f"{status.name:<20} {status.events_applied:>9} {status.lag_events:>11} {status.lag_s:>8.1f}  {last:<19}  "
            f"{status.checkpoint}{note}"
        )


def rebuild_command(args: argparse.Namespace) -> int:
    projection = read_model(args.name, args.settings.native_provider_id)

    async def work(pool: asyncpg.Pool) -> int:
        with tqdm(total=await count_events(pool), unit="event", desc=f"rebuild {projection.name}") as bar:
            result = await rebuild(pool, projection, batch_events_max=args.batch_events_max, on_progress=bar.update)
        return result.events_applied

    try:
        applied = with_database(work, args.settings.database)
    except RebuildInProgress as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"rebuilt {projection.name}: {applied} event(s) replayed, swapped in")
    return 0


# ---- plumbing ------------------------------------------------------------------------------


def _status_json(status: ProjectionStatus) -> dict[str, object]:
    return {
        "name": status.name,
        "checkpoint": status.checkpoint.render(),
        "eventsApplied": status.events_applied,
        "lagEvents": status.lag_events,
        "lagEventsBySource": {str(source): lag for source, lag in status.lag_by_source.items()},
        "lagSeconds": round(status.lag_s, 3),
        "lastEventAt": None if status.last_event_at is None else status.last_event_at.isoformat(),
        "rebuilding": status.rebuilding,
    }


async def _events_behind(pool: asyncpg.Pool) -> int:
    """What a catch-up will apply: every projection's lag, added up."""
    return sum(status.lag_events for status in await checkpoints.statuses(pool))


async def _all_of(jobs: list[Awaitable[None]]) -> None:
    # A coroutine, not the bare gather: cancelling its task cancels the jobs and awaits them.
    await asyncio.gather(*jobs)


async def _while_alive(parent_pid: int, work: Awaitable[None], check_interval_s: float = 1.0) -> None:
    """Runs ``work`` until it ends or this process's parent ``parent_pid`` is gone."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            if os.getppid() != parent_pid:
                log.warning("serve (pid %d) is gone; its background process stops", parent_pid)
                task.cancel()
                break
            await asyncio.wait({task}, timeout=check_interval_s)
        await task
    finally:
        task.cancel()


async def _until_signalled(work: Awaitable[None]) -> None:
    """Runs ``work`` until SIGTERM or SIGINT, then cancels it: an open batch rolls back, nothing is lost."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("projection runner stopped")
