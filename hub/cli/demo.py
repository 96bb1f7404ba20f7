"""``giftcard demo``: fill a fresh database with a realistic data set (``hub.demo`` makes it)."""

from __future__ import annotations

import argparse

import asyncpg

from hub import demo
from ledger.postgres.database import with_database


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo_cmd = commands.add_parser("demo", help="fill a fresh database with a realistic data set to try things out")
    demo_cmd.add_argument("--cards", type=int, default=3000, help="how many cards (default 3000)")
    demo_cmd.add_argument("--seed", type=int, default=7, help="random seed, for a repeatable data set")
    demo_cmd.add_argument(
        "--base-url", default="http://127.0.0.1:8080", help="where `giftcard serve` will listen (for the partner)"
    )
    demo_cmd.set_defaults(run=demo_fill)


def demo_fill(args: argparse.Namespace) -> int:
    settings = args.settings

    async def fill(pool: asyncpg.Pool) -> demo.DemoSummary | None:
        if await demo.has_demo_data(pool):
            return None
        return await demo.fill(
            pool,
            cards=args.cards,
            seed=args.seed,
            native_id=settings.native_provider_id,
            base_url=args.base_url,
            secret_key=settings.secret_key,
        )

    summary = with_database(fill, settings.database)
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
