"""``giftcard privacy forget | export``: a shopper's rights of erasure and of access (``ledger.postgres.personal_data``)."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

import asyncpg

from hub.cli.arguments import add_tenant_filter
from hub.wire import encode
from ledger.eventstore.store import EventStore
from ledger.postgres.database import with_database
from ledger.postgres.personal_data import PersonalData, export, forget
from ledger.postgres.tenancy import UnknownTenant, require_tenant

EXIT_OK, EXIT_USAGE = 0, 2


def add_commands(commands: argparse._SubParsersAction) -> None:
    privacy = commands.add_parser("privacy", help="a shopper's personal data: erase it, or export it")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)
    erase = privacy_commands.add_parser(
        "forget", help="destroy a person's data keys: their personal data reads as erased from then on"
    )
    _add_profile(erase)
    add_tenant_filter(erase, "forget in this store (VTEX account) only")
    erase.add_argument("--actor", default=None, help="who asks, recorded with the erasure (default: the OS user)")
    erase.set_defaults(run=privacy_forget)
    access = privacy_commands.add_parser("export", help="write everything held about a person, as JSON")
    _add_profile(access)
    add_tenant_filter(access, "export what this store (VTEX account) holds only")
    access.add_argument("--output", type=Path, default=None, help="file to write (default: standard output)")
    access.set_defaults(run=privacy_export)


def _add_profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        action="append",
        required=True,
        type=_identifier,
        help="the person's profileId or e-mail (or document); repeat to name one person by several",
    )


def _identifier(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def privacy_forget(args: argparse.Namespace) -> int:
    actor = args.actor or getpass.getuser()

    async def work(pool: asyncpg.Pool):
        if args.tenant:
            await require_tenant(pool, args.tenant)
        personal = PersonalData(pool, args.settings.secret_key)
        return await forget(EventStore(pool), personal, args.profile, actor, args.tenant)

    try:
        done = with_database(work, args.settings.database)
    except UnknownTenant as e:
        print(f"refused: {e}; nothing written", file=sys.stderr)
        return EXIT_USAGE
    where = f"in store {args.tenant}" if args.tenant else "in any store"
    if not done:
        print(f"nothing held for that person any more {where} (already forgotten, or never seen): nothing written")
        return EXIT_OK
    for forgotten in done:
        print(
            f"store {forgotten.tenant}: forgot {forgotten.keys_destroyed} data key(s) and "
            f"{forgotten.owners_erased} card owner lookup(s); recorded as {forgotten.erasure} (by {actor})"
        )
    print(
        f"acted in {len(done)} store(s): {', '.join(f.tenant for f in done)}; every hub process reads the data "
        f"as erased within GIFTCARD_PRIVACY_POLL_S ({args.settings.privacy_poll_s:g} s)"
    )
    return EXIT_OK


def privacy_export(args: argparse.Namespace) -> int:
    async def work(pool: asyncpg.Pool):
        if args.tenant:
            await require_tenant(pool, args.tenant)
        personal = PersonalData(pool, args.settings.secret_key)
        return await export(EventStore(pool), personal, args.profile, args.tenant)

    try:
        document = encode(with_database(work, args.settings.database))
    except UnknownTenant as e:
        print(f"refused: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.output is None:
        sys.stdout.buffer.write(document + b"\n")
    else:
        args.output.write_bytes(document + b"\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return EXIT_OK
