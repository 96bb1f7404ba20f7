"""``giftcard db upgrade | status | add-worker HOST | grant ROLE``: the schema, replication, Citus
workers, the service's role."""

from __future__ import annotations

import argparse
import os
import sys

import asyncpg
import msgspec

from ledger.postgres.database import Database, with_database
from ledger.postgres.distribution import add_worker
from ledger.postgres.migrate import create_login_role, grant_service_role, upgrade
from ledger.postgres.replication import Replication, replication_status

EXIT_USAGE = 2


def add_commands(commands: argparse._SubParsersAction) -> None:
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
    add = db_commands.add_parser("add-worker", help="on a Citus coordinator: register a worker node")
    add.add_argument("host", help="the worker's host name, as the coordinator and the other workers reach it")
    add.add_argument("--port", type=int, default=5432, help="the worker's PostgreSQL port (default 5432)")
    add.add_argument(
        "--coordinator-host", help="the coordinator's own host name, as the workers reach it (set once, first)"
    )
    add.set_defaults(run=db_add_worker)
    grant = db_commands.add_parser("grant", help="grant the service's role what it needs, and no rewriting of events")
    grant.add_argument("role", help="the PostgreSQL role the service connects as")
    grant.add_argument(
        "--create-with-password-env",
        metavar="VAR",
        help="create the role first, as a login role whose password is in environment variable VAR, "
        "when it does not exist (a fresh deployment); the password is never printed",
    )
    grant.set_defaults(run=db_grant)


def db_upgrade(args: argparse.Namespace) -> int:
    async def apply(pool: asyncpg.Pool) -> list[str]:
        async with pool.acquire() as connection:
            return await upgrade(connection)

    applied = with_database(apply, _acted_on(args.settings.database))
    print("applied: " + ", ".join(applied) if applied else "database schema is current")
    return 0


def db_status(args: argparse.Namespace) -> int:
    """Which server answered, whether its commits are synchronously replicated, each standby's lag."""
    replication = with_database(replication_status, _server(args), upgrade_schema=False)
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


def db_add_worker(args: argparse.Namespace) -> int:
    async def add(pool: asyncpg.Pool) -> int:
        async with pool.acquire() as connection:
            return await add_worker(connection, args.host, args.port, coordinator_host=args.coordinator_host)

    try:
        # Not upgraded: distributing the tables needs the workers first.
        node_id = with_database(add, _server(args), upgrade_schema=False)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(
        f"worker {args.host}:{args.port} added (node {node_id}); move shards to it with: select citus_rebalance_start()"
    )
    return 0


def db_grant(args: argparse.Namespace) -> int:
    password = None
    if args.create_with_password_env:
        password = os.environ.get(args.create_with_password_env)
        if not password:
            print(f"--create-with-password-env: {args.create_with_password_env} is not set", file=sys.stderr)
            return EXIT_USAGE

    async def grant(pool: asyncpg.Pool) -> None:
        async with pool.acquire() as connection, connection.transaction():
            if password is not None and await create_login_role(connection, args.role, password):
                print(f"created login role {args.role}")
            await grant_service_role(connection, args.role)

    with_database(grant, _server(args))
    print(f"granted {args.role}: read and append events, never update, delete or truncate them")
    return 0


def _acted_on(database: Database) -> Database:
    """Says first which database the command acts on (on stderr: stdout stays the command's answer)."""
    print(f"database: {database.described()}", file=sys.stderr, flush=True)
    return database


def _server(args: argparse.Namespace) -> Database:
    """A configured server: replication, workers and roles are a real server's, never a throwaway
    embedded one's, so none is started for them."""
    database = args.settings.database
    if database.url is None:
        print(
            f"giftcard db {args.db_command}: no database named: set GIFTCARD_DATABASE_URL or pass --database-url",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE)
    return _acted_on(database)
