"""``giftcard tenants create | list | set | suspend | resume | export | delete``: the stores a
deployment serves (``ledger.postgres.tenants``), each act logged in ``tenant_log`` with the
operating-system user who ran it.

Exit codes: 0 done; 1 refused by the tenant's state (it exists already, is not suspended, its
retention has not passed, it was deleted); 2 a bad argument (an account name that is none, a
tenant that does not exist, an output folder that is not new or empty).
"""

from __future__ import annotations

import argparse
import functools
import getpass
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec

from hub.cli.arguments import bounded_int, positive_int
from hub.cli.keys import account
from hub.http import auth
from ledger.postgres import tenants
from ledger.postgres.database import with_database
from ledger.postgres.tenants import Limits, TenantRefused, UnknownTenant
from projections.exports.tenant_export import ExportFolderRefused, export_tenant

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
RETENTION_DAYS_MAX = 100 * 366


def add_commands(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("tenants", help="the stores (VTEX accounts) this deployment serves")
    sub = group.add_subparsers(dest="tenants_command", required=True)

    create = sub.add_parser("create", help="a new tenant, with its first hub and provider key pairs (printed once)")
    create.add_argument("account", type=account, help="its VTEX account name")
    _add_limits(create, "none")
    create.set_defaults(run=tenants_create)

    sub.add_parser("list", help="every tenant: limits, state, cards").set_defaults(run=tenants_list)

    limits = sub.add_parser("set", help="change a tenant's limits (logged)")
    limits.add_argument("account", type=account)
    _add_limits(limits, "unchanged")
    limits.set_defaults(run=tenants_set)

    suspend = sub.add_parser("suspend", help="refuse every request of a tenant (403), keeping its data")
    suspend.add_argument("account", type=account)
    suspend.add_argument(
        "--retention-days",
        type=bounded_int(0, RETENTION_DAYS_MAX),
        help="days its data is kept before it may be deleted (default GIFTCARD_TENANT_RETENTION_DAYS)",
    )
    suspend.set_defaults(run=tenants_suspend)

    resume = sub.add_parser("resume", help="serve a suspended tenant again")
    resume.add_argument("account", type=account)
    resume.set_defaults(run=tenants_resume)

    export = sub.add_parser("export", help="write everything of a tenant into a new folder (see the README)")
    export.add_argument("account", type=account)
    export.add_argument("--output", type=Path, required=True, help="a folder that does not exist yet, or is empty")
    export.set_defaults(run=tenants_export)

    delete = sub.add_parser("delete", help="remove every row of a suspended tenant whose retention has passed")
    delete.add_argument("account", type=account)
    delete.add_argument("--yes", action="store_true", help="do not ask: the removal cannot be undone")
    delete.set_defaults(run=tenants_delete)


def _add_limits(parser: argparse.ArgumentParser, absent: str) -> None:
    for flag, what in (("--max-rps", "requests per second"), ("--max-concurrent", "requests at once")):
        parser.add_argument(flag, type=_limit, default=msgspec.UNSET, help=f"{what}, or none (default {absent})")


def _limit(value: str) -> int | None:
    """A limit, or ``none`` for no limit of the tenant's own."""
    return None if value.strip().lower() == "none" else positive_int(value)


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(max_rps=args.max_rps, max_concurrent=args.max_concurrent)


def _actor() -> str:
    return getpass.getuser()


def _refusals_exit(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The command, its refusals said on stderr with their exit codes."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (UnknownTenant, ExportFolderRefused) as e:
            print(str(e), file=sys.stderr)
            return EXIT_USAGE
        except TenantRefused as e:
            print(str(e), file=sys.stderr)
            return EXIT_REFUSED

    return run


@_refusals_exit
def tenants_create(args: argparse.Namespace) -> int:
    async def create(pool: asyncpg.Pool) -> dict[str, tuple[str, str]]:
        async with pool.acquire() as connection, connection.transaction():
            await tenants.create_tenant(connection, args.account, _limits(args), _actor())
            return {
                audience: await auth.insert_key(connection, audience, auth.ROLES, args.account)
                for audience in (auth.HUB, auth.PROVIDER)
            }

    pairs = with_database(create, args.settings.database)
    print(f"created tenant {args.account}")
    for audience, pair in pairs.items():
        print(f"{audience} key pair:\n{auth.printed_pair(audience, pair)}")
    print("(the tokens are shown once; only their hashes are kept)")
    return EXIT_OK


def tenants_list(args: argparse.Namespace) -> int:
    rows = with_database(tenants.list_tenants, args.settings.database)
    print(f"{'account':<24} {'state':<9} {'created':<19}  {'max rps':>8} {'max conc':>8} {'cards':>8}  delete after")
    for tenant in rows:
        print(
            f"{tenant.account:<24} {tenant.state:<9} {tenant.created_at:%Y-%m-%d %H:%M:%S}  "
            f"{_shown(tenant.max_rps):>8} {_shown(tenant.max_concurrent):>8} {tenant.cards:>8}  "
            f"{_when(tenant.delete_after)}"
        )
    return EXIT_OK


@_refusals_exit
def tenants_set(args: argparse.Namespace) -> int:
    limits = _limits(args)
    if not limits.given():
        print("tenants set: give --max-rps and/or --max-concurrent (a number, or none)", file=sys.stderr)
        return EXIT_USAGE
    tenant = with_database(
        lambda pool: tenants.set_limits(pool, args.account, limits, _actor()), args.settings.database
    )
    print(
        f"tenant {tenant.account}: max rps {_shown(tenant.max_rps)}, max concurrent {_shown(tenant.max_concurrent)}; "
        f"every process applies it within {auth.KEY_REFRESH_S:g} s"
    )
    return EXIT_OK


@_refusals_exit
def tenants_suspend(args: argparse.Namespace) -> int:
    days = args.settings.tenant_retention_days if args.retention_days is None else args.retention_days
    retention = timedelta(days=days)
    tenant = with_database(
        lambda pool: tenants.suspend(pool, args.account, retention, _actor()), args.settings.database
    )
    print(
        f"suspended tenant {tenant.account}: every process answers its requests 403 within "
        f"{auth.KEY_REFRESH_S:g} s; its data is kept, and may be deleted from {_when(tenant.delete_after)} on"
    )
    return EXIT_OK


@_refusals_exit
def tenants_resume(args: argparse.Namespace) -> int:
    tenant = with_database(lambda pool: tenants.resume(pool, args.account, _actor()), args.settings.database)
    print(f"resumed tenant {tenant.account}: every process serves it again within {auth.KEY_REFRESH_S:g} s")
    return EXIT_OK


@_refusals_exit
def tenants_export(args: argparse.Namespace) -> int:
    async def export(pool: asyncpg.Pool):
        await tenants.get_tenant(pool, args.account)  # an unknown one is refused, not exported empty
        manifest = await export_tenant(pool, args.account, args.output)
        rows = {name: file.rows for name, file in manifest.files.items()}
        await tenants.record_act(pool, args.account, tenants.EXPORTED, _actor(), {"rows": rows})
        return manifest

    manifest = with_database(export, args.settings.database)
    events = manifest.files["events.csv"].rows
    rows = sum(file.rows for file in manifest.files.values())
    print(f"exported tenant {args.account} to {args.output}: {rows} row(s) in {len(manifest.files)} file(s)")
    print(f"{events} event(s) with their hash chains; check them with: giftcard audit verify --from {args.output}")
    return EXIT_OK


@_refusals_exit
def tenants_delete(args: argparse.Namespace) -> int:
    if args.account == args.settings.default_tenant:
        print(
            f"tenant {args.account!r} is the default tenant (GIFTCARD_DEFAULT_TENANT): the environment's keys and "
            "the operator's own writes belong to it, so it is never deleted",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    if not args.yes and not _confirmed(args.account):
        print("nothing deleted", file=sys.stderr)
        return EXIT_REFUSED
    try:
        removed = with_database(
            lambda pool: tenants.delete_tenant(pool, args.account, _actor()), args.settings.database
        )
    except asyncpg.InsufficientPrivilegeError as e:
        print(
            f"nothing deleted: {e.message}. Remove a tenant as the schema's owner (the role that runs "
            "giftcard db upgrade): the service's role may never delete events",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    print(f"deleted tenant {args.account}: {sum(removed.values())} row(s) removed, logged in tenant_log")
    for table, count in removed.items():
        if count:
            print(f"  {table}: {count}")
    return EXIT_OK


def _confirmed(account_name: str) -> bool:
    """Asked on a terminal only; elsewhere (a script, a pipe) --yes is needed."""
    if not sys.stdin.isatty():
        print("tenants delete: pass --yes to remove a tenant without a terminal to confirm on", file=sys.stderr)
        return False
    answer = input(f"remove every row of tenant {account_name}, for good? type its account to confirm: ")
    return answer.strip() == account_name


def _shown(limit: int | None) -> str:
    return "-" if limit is None else str(limit)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S %Z}"
