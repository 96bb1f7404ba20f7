"""``giftcard keys create | list | revoke``: API credentials (``hub.http.auth`` keeps them)."""

from __future__ import annotations

import argparse
import sys

from hub.cli.arguments import account
from hub.http import auth
from ledger.postgres.database import with_database


def add_commands(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="API credentials: key/token pairs with roles")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a pair; the token is printed once")
    create.add_argument("--audience", choices=sorted(auth.HEADERS), default=auth.HUB, help="who uses it (default hub)")
    create.add_argument(
        "--role", action="append", choices=auth.ROLES, help="view (reads and searches) or edit; repeat for both"
    )
    create.add_argument(
        "--tenant",
        type=account,
        metavar="ACCOUNT",
        help="the store (VTEX account) it acts for; created with its first key (default GIFTCARD_DEFAULT_TENANT)",
    )
    create.add_argument(
        "--operator",
        action="store_true",
        help="an operator's pair: it may also read every tenant's audit (the auditor's pages and audit API)",
    )
    create.set_defaults(run=keys_create)
    keys_commands.add_parser("list", help="list pairs (never their tokens)").set_defaults(run=keys_list)
    revoke = keys_commands.add_parser("revoke", help="revoke a pair by its app key")
    revoke.add_argument("app_key")
    revoke.set_defaults(run=keys_revoke)


def keys_create(args: argparse.Namespace) -> int:
    roles = tuple(args.role or auth.ROLES)
    tenant = args.tenant or args.settings.default_tenant
    try:
        pair = with_database(
            lambda pool: auth.create_key(pool, args.audience, roles, tenant, operator=args.operator),
            args.settings.database,
        )
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"{auth.printed_pair(args.audience, pair)}\n(the token is shown once; only its hash is kept)")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    rows = with_database(auth.list_keys, args.settings.database)
    print(f"{'app key':<34} {'tenant':<20} {'audience':<9} {'roles':<10} {'created':<20} revoked")
    for row in rows:
        revoked = row["revoked_at"].strftime("%Y-%m-%d %H:%M:%S") if row["revoked_at"] else "-"
        roles = ",".join(row["roles"]) + (" (bootstrap)" if row["bootstrap"] else "")
        roles += " (operator)" if row["operator"] else ""
        print(
            f"{row['app_key']:<34} {row['tenant_id']:<20} {row['audience']:<9} {roles:<10} "
            f"{row['created_at']:%Y-%m-%d %H:%M:%S}  {revoked}"
        )
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    if with_database(lambda pool: auth.revoke_key(pool, args.app_key), args.settings.database):
        print(f"revoked {args.app_key}; every process refuses it within {auth.KEY_REFRESH_S:g} s")
        return 0
    print(f"no active key {args.app_key!r}", file=sys.stderr)
    return 1
