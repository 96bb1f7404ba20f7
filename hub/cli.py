"""The ``giftcard`` command line."""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import signal
import sys
import tempfile
from typing import TypeVar

import asyncpg
import msgspec
from aiohttp import web

from hub import bulk_cli, demo, webhooks
from hub.app import create_app
from hub.config import Settings
from hub.http import auth
from hub.logs import JsonAccessLogger, configure_logging
from ledger.database import resolve_database_url, with_database
from ledger.migrate import grant_service_role_statements, upgrade
from ledger.replication import Replication, replication_status
from projections import cli as projections_cli
from projections import finance_cli

T = TypeVar("T")

PROJECTION_RUNNER_NICENESS = 10  # requests first: read models may lag a busy second, a Debit may not


def serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    url, embedded = resolve_database_url()
    print(
        f"giftcard serving on http://{args.host}:{args.port} ({args.workers} process(es))", file=sys.stderr, flush=True
    )
    runner = start_projection_runner(settings, url) if settings.run_projections else None
    # The runner process has the projections; the workers know of each other (see Ledger's shared_cards).
    web_settings = msgspec.structs.replace(settings, run_projections=False, workers=args.workers)
    try:
        if args.workers == 1:
            run_worker(web_settings, url, args.host, args.port, reuse_port=False)
        else:
            run_workers(web_settings, url, args.host, args.port, args.workers)
    finally:
        if runner is not None:
            stop_process(runner)
        if embedded is not None:
            embedded.stop()
    return 0


def start_projection_runner(settings: Settings, url: str) -> multiprocessing.Process:
    """The read models' runner beside the web workers, so no request waits behind a batch."""
    runner = multiprocessing.get_context("spawn").Process(
        target=_projection_runner_main,
        args=(url, settings.native_provider_id, os.getpid()),
        name="giftcard-projections",
        daemon=True,
    )
    runner.start()
    return runner


def _projection_runner_main(url: str, native_provider_id: str, serve_pid: int) -> None:
    configure_logging()
    os.nice(PROJECTION_RUNNER_NICENESS)
    projections_cli.run_beside_serve(url, native_provider_id, serve_pid)


def stop_process(process: multiprocessing.Process, timeout_s: float = 10.0) -> None:
    if process.is_alive():
        os.kill(process.pid, signal.SIGTERM)  # its batch in flight rolls back; the next run redoes it
    process.join(timeout_s)
    if process.is_alive():
        process.kill()


def run_worker(settings: Settings, url: str, host: str, port: int, *, reuse_port: bool) -> None:
    app = create_app(settings, url)
    app.on_startup.append(freeze_startup_objects)
    # run_app stops accepting on SIGINT/SIGTERM and lets in-flight requests finish.
    web.run_app(
        app,
        host=host,
        port=port,
        reuse_port=reuse_port,
        shutdown_timeout=settings.shutdown_timeout_s,
        print=None,
        access_log_class=JsonAccessLogger,
    )


async def freeze_startup_objects(app: web.Application) -> None:
    """What start-up allocated (modules, routes, pools) lives as long as the process: moved out of
    the garbage collector's sight, a full collection under load walks only what requests create."""
    gc.collect()
    gc.freeze()


def run_workers(settings: Settings, url: str, host: str, port: int, count: int) -> None:
    """Several processes on one port (SO_REUSEPORT): the kernel spreads connections over them.

    They share nothing but the database, which is all the ledger needs: every
    invariant is checked against the card's stream at append time.
    """
    # Every worker writes its metrics here, so whichever answers /metrics answers for all.
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="giftcard-metrics-"))
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker_main, args=(settings, url, host, port), name=f"giftcard-worker-{n}")
        for n in range(count)
    ]
    for worker in workers:
        worker.start()

    def stop(signum: int, frame: object) -> None:
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.join()


def _worker_main(settings: Settings, url: str, host: str, port: int) -> None:
    configure_logging()
    run_worker(settings, url, host, port, reuse_port=True)


def db_upgrade(args: argparse.Namespace) -> int:
    async def apply(pool: asyncpg.Pool) -> list[str]:
        async with pool.acquire() as connection:
            return await upgrade(connection)

    applied = with_database(apply)
    print("applied: " + ", ".join(applied) if applied else "database schema is current")
    return 0


def db_status(args: argparse.Namespace) -> int:
    """Which server answered, whether its commits are synchronously replicated, each standby's lag."""
    replication = with_database(replication_status, upgrade_schema=False)
    if args.json:
        print(msgspec.json.encode(replication.to_wire()).decode())
    else:
        print(describe_replication(replication))
    return 0 if replication.synchronous or not args.check else 1


def describe_replication(replication: Replication) -> str:
    reason = replication.why_not_synchronous()
    lines = [
        "synchronously replicated: " + ("yes" if reason is None else f"NO ({reason})"),
        f"synchronous_commit: {replication.synchronous_commit}",
        f"synchronous_standby_names: {replication.synchronous_standby_names or '(empty)'}",
        f"standbys: {len(replication.standbys)}",
    ]
    for s in replication.standbys:
        lag_s = "?" if s.replay_lag_s is None else f"{s.replay_lag_s:.3f} s"
        lag_bytes = "?" if s.lag_bytes is None else f"{s.lag_bytes} bytes"
        lines.append(f"  {s.name or '?'}: {s.state or '?'}, {s.sync_state or '?'}, replay lag {lag_s}, {lag_bytes}")
    return "\n".join(lines)


def db_grant(args: argparse.Namespace) -> int:
    async def grant(pool: asyncpg.Pool) -> None:
        async with pool.acquire() as connection, connection.transaction():
            for statement in grant_service_role_statements(args.role):
                await connection.execute(statement)

    with_database(grant)
    print(f"granted {args.role}: read and append events, never update, delete or truncate them")
    return 0


def demo_fill(args: argparse.Namespace) -> int:
    native_id = Settings.from_env().native_provider_id

    async def fill(pool: asyncpg.Pool) -> demo.DemoSummary | None:
        if await demo.has_demo_data(pool):
            return None
        return await demo.fill(pool, cards=args.cards, seed=args.seed, native_id=native_id, base_url=args.base_url)

    summary = with_database(fill)
    if summary is None:
        print("this database already holds demo data; point GIFTCARD_DATA_DIR or GIFTCARD_DATABASE_URL elsewhere")
        return 1
    print(
        f"{summary.cards} cards, {summary.transactions} transactions, {summary.settlements} settlements, "
        f"{summary.cancellations} cancellations ({summary.refused} realistic refusals, nothing written for them)"
    )
    if summary.partner_registered:
        print(
            f"external provider {demo.PARTNER_ID} registered at {args.base_url}/native "
            "(serve with GIFTCARD_PROVIDER_ALLOWLIST=127.0.0.1 to let the hub call it)"
        )
    else:
        print("no external provider registered: set GIFTCARD_SECRET_KEY so its credentials can be encrypted")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from bench import suite  # the benchmarks and their baselines load only when asked for

    return suite.main([*(["--quick"] if args.quick else []), *(["--json", args.json] if args.json else [])])


def keys_create(args: argparse.Namespace) -> int:
    roles = tuple(args.role or auth.ROLES)
    app_key, app_token = with_database(lambda pool: auth.create_key(pool, args.audience, roles))
    key_header, token_header = auth.HEADERS[args.audience]
    print(f"{key_header}: {app_key}\n{token_header}: {app_token}\n(the token is shown once; only its hash is kept)")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    rows = with_database(auth.list_keys)
    print(f"{'app key':<34} {'audience':<9} {'roles':<10} {'created':<20} revoked")
    for row in rows:
        revoked = row["revoked_at"].strftime("%Y-%m-%d %H:%M:%S") if row["revoked_at"] else "-"
        roles = ",".join(row["roles"]) + (" (bootstrap)" if row["bootstrap"] else "")
        print(f"{row['app_key']:<34} {row['audience']:<9} {roles:<10} {row['created_at']:%Y-%m-%d %H:%M:%S}  {revoked}")
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    if with_database(lambda pool: auth.revoke_key(pool, args.app_key)):
        print(f"revoked {args.app_key}; every process refuses it within {auth.KEY_REFRESH_S:g} s")
        return 0
    print(f"no active key {args.app_key!r}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="giftcard", description="Gift card hub and event-sourced native provider")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the HTTP service in the foreground")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve_cmd.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port; one per core uses every core (default 1)"
    )
    serve_cmd.set_defaults(run=serve)

    db = commands.add_parser("db", help="database schema and replication")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply pending migrations (serve does this at start)").set_defaults(
        run=db_upgrade
    )
    status = db_commands.add_parser(
        "status", help="is every commit on a synchronous standby too, and how far is each standby behind"
    )
    status.add_argument("--json", action="store_true", help="the same as /readyz's replication object")
    status.add_argument("--check", action="store_true", help="exit 1 unless synchronously replicated")
    status.set_defaults(run=db_status)
    grant = db_commands.add_parser("grant", help="grant the service's role what it needs, and no rewriting of events")
    grant.add_argument("role", help="the existing PostgreSQL role the service connects as")
    grant.set_defaults(run=db_grant)

    demo_cmd = commands.add_parser("demo", help="fill a fresh database with a realistic data set to try things out")
    demo_cmd.add_argument("--cards", type=int, default=3000, help="how many cards (default 3000)")
    demo_cmd.add_argument("--seed", type=int, default=7, help="random seed, for a repeatable data set")
    demo_cmd.add_argument(
        "--base-url", default="http://127.0.0.1:8080", help="where `giftcard serve` will listen (for the partner)"
    )
    demo_cmd.set_defaults(run=demo_fill)

    bench = commands.add_parser(
        "bench", help="the benchmark suite side by side (raw PostgreSQL, stock eventsourcing, this service)"
    )
    bench.add_argument("--quick", action="store_true", help="a smoke run, under three minutes")
    bench.add_argument("--json", metavar="FILE", help="write every figure and ratio here")
    bench.set_defaults(run=run_bench)

    keys = commands.add_parser("keys", help="API credentials: key/token pairs with roles")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a pair; the token is printed once")
    create.add_argument("--audience", choices=sorted(auth.HEADERS), default=auth.HUB, help="who uses it (default hub)")
    create.add_argument(
        "--role", action="append", choices=auth.ROLES, help="view (reads and searches) or edit; repeat for both"
    )
    create.set_defaults(run=keys_create)
    keys_commands.add_parser("list", help="list pairs (never their tokens)").set_defaults(run=keys_list)
    revoke = keys_commands.add_parser("revoke", help="revoke a pair by its app key")
    revoke.add_argument("app_key")
    revoke.set_defaults(run=keys_revoke)

    projections_cli.add_commands(commands, native_provider_id=lambda: Settings.from_env().native_provider_id)

    finance_cli.add_commands(commands, native_provider_id=lambda: Settings.from_env().native_provider_id)

    webhooks.add_commands(commands)

    bulk_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
