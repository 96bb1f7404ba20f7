"""``giftcard webhooks add | list | remove | rotate-secret | replay | dead-letters | run``.

Thin calls into ``hub.webhooks`` (storage, subscriptions, the deliverer).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from hub.http.webhooks_api import render_dead_letter, render_subscription
from hub.providers.egress import EgressPolicy
from hub.webhooks import storage
from hub.webhooks.delivery import Deliverer, DeliveryOptions, delivery_client, run_deliveries
from hub.webhooks.events import EVENT_TYPES
from hub.webhooks.subscriptions import create_subscription, drop_previous_secret, rotate_secret
from hub.wire import encode
from ledger.domain.errors import DomainError
from ledger.postgres.credentials_cipher import CredentialsCipher
from ledger.postgres.database import with_database

T = TypeVar("T")

DEAD_LETTERS_LISTED_MAX = 1000
# ``with_database`` opens 4 connections; each subscription being delivered holds one, and listing
# the due subscriptions needs one more.
CLI_SUBSCRIPTIONS_CONCURRENT_MAX = 3


def add_commands(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("webhooks", help="outbound events: subscriptions, dead letters, replay, deliverer")
    sub = group.add_subparsers(dest="webhooks_command", required=True)

    add = sub.add_parser("add", help="subscribe a URL; prints its signing secret once")
    add.add_argument("url", help="where events are POSTed (must pass the egress policy)")
    add.add_argument("--events", help=f"comma-separated types (default: every type): {','.join(EVENT_TYPES)}")
    add.add_argument("--description", help="a note for operators")
    add.set_defaults(run=add_command)

    listing = sub.add_parser("list", help="subscriptions, their position, lag, failures and dead letters")
    listing.add_argument("--json", action="store_true", help="one JSON object per subscription")
    listing.set_defaults(run=list_command)

    remove = sub.add_parser("remove", help="delete a subscription and its dead letters")
    remove.add_argument("subscription")
    remove.set_defaults(run=remove_command)

    rotate = sub.add_parser("rotate-secret", help="a new signing secret, printed once; the old one signs beside it")
    rotate.add_argument("subscription")
    rotate.add_argument(
        "--drop-previous", action="store_true", help="end the rotation: only the newest secret signs from now on"
    )
    rotate.set_defaults(run=rotate_secret_command)

    replay = sub.add_parser("replay", help="deliver again every event from a position on")
    replay.add_argument("subscription")
    replay.add_argument("--from-position", type=int, required=True, help="an event id (its global position)")
    replay.set_defaults(run=replay_command)

    dead = sub.add_parser("dead-letters", help="events given up on after the maximum attempts")
    dead.add_argument("subscription", nargs="?", help="one subscription (default: all)")
    dead.add_argument("--retry", action="store_true", help="ask the deliverers for one more attempt at each")
    dead.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    dead.set_defaults(run=dead_letters_command)

    run = sub.add_parser("run", help="a standalone deliverer (one also runs inside serve by default)")
    run.add_argument("--once", action="store_true", help="deliver what is due now, then exit")
    run.set_defaults(run=run_command)


# ---- commands ------------------------------------------------------------------------------


def add_command(args: argparse.Namespace) -> int:
    events = None if args.events is None else [e.strip() for e in args.events.split(",") if e.strip()]
    settings = args.settings
    policy = EgressPolicy(settings.provider_allowlist)

    async def work(pool: asyncpg.Pool) -> Any:
        return await create_subscription(
            pool,
            CredentialsCipher(settings.secret_key),
            policy,
            url=args.url,
            event_types=events,
            description=args.description,
        )

    created = _refusals_exit(args, work)
    subscription = created.subscription
    print(f"webhook {subscription.id} -> {subscription.url} ({_events_text(subscription)})")
    print(f"signing secret (shown once; only an encrypted copy is kept):\n  {created.secret}")
    return 0


def list_command(args: argparse.Namespace) -> int:
    found = _refusals_exit(args, storage.list_subscriptions)
    if args.json:
        for subscription in found:
            print(encode(render_subscription(subscription)).decode())
        return 0
    print(f"{'id':<20} {'lag':>7} {'delivered':>9} {'failing':>7} {'dead':>5}  url (events)")
    for s in found:
        print(
            f"{s.id:<20} {s.lag_events:>7} {s.delivered:>9} {s.attempts:>7} "
            f"{s.dead_letters:>5}  {s.url} ({_events_text(s)})"
        )
        print(f"{'':<20} place (source:seq): {s.checkpoint}")
        if s.last_error:
            print(f"{'':<20} last error: {s.last_error}")
    return 0


def remove_command(args: argparse.Namespace) -> int:
    _refusals_exit(args, lambda pool: storage.remove(pool, args.subscription))
    print(f"removed {args.subscription}")
    return 0


def rotate_secret_command(args: argparse.Namespace) -> int:
    cipher = CredentialsCipher(args.settings.secret_key)
    if args.drop_previous:
        dropped = _refusals_exit(args, lambda pool: drop_previous_secret(pool, cipher, args.subscription))
        print(
            f"{args.subscription}: "
            + ("the previous secret no longer signs" if dropped else "no previous secret was kept")
        )
        return 0
    secret = _refusals_exit(args, lambda pool: rotate_secret(pool, cipher, args.subscription))
    print(f"new signing secret for {args.subscription} (shown once; only an encrypted copy is kept):\n  {secret}")
    print(
        "deliveries are signed with it and with the previous secret until "
        f"`giftcard webhooks rotate-secret {args.subscription} --drop-previous`"
    )
    return 0


def replay_command(args: argparse.Namespace) -> int:
    subscription = _refusals_exit(args, lambda pool: storage.replay(pool, args.subscription, args.from_position))
    print(
        f"{subscription.id} replays from position {args.from_position}: "
        f"{subscription.lag_events} event(s) to go through again"
    )
    return 0


def dead_letters_command(args: argparse.Namespace) -> int:
    async def work(pool: asyncpg.Pool) -> tuple[list[storage.DeadLetter], int, int]:
        if args.subscription is not None:
            await storage.get(pool, args.subscription)  # an unknown id is an error, not an empty list
        marked = await storage.request_retry(pool, args.subscription) if args.retry else 0
        letters, total = await storage.dead_letters(pool, args.subscription, 0, DEAD_LETTERS_LISTED_MAX)
        return letters, total, marked

    letters, total, marked = _refusals_exit(args, work)
    if args.json:
        for letter in letters:
            print(encode(render_dead_letter(letter)).decode())
    else:
        _print_dead_letters(letters, total)
    if args.retry:
        print(f"{marked} dead letter(s) queued for one more attempt by the running deliverers", file=sys.stderr)
    return 0


def run_command(args: argparse.Namespace) -> int:
    settings = args.settings
    options = DeliveryOptions.from_settings(settings, subscriptions_concurrent_max=CLI_SUBSCRIPTIONS_CONCURRENT_MAX)

    async def once(pool: asyncpg.Pool) -> int:
        policy = EgressPolicy(settings.provider_allowlist)
        async with delivery_client(policy) as client:
            return await Deliverer(pool, client, CredentialsCipher(settings.secret_key), options).run_once()

    async def until_signalled(pool: asyncpg.Pool) -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        await run_deliveries(pool, settings, stop, options=options)

    if args.once:
        print(f"delivered: {_refusals_exit(args, once)} event(s) handled")
    else:
        _refusals_exit(args, until_signalled)
    return 0


# ---- plumbing ------------------------------------------------------------------------------


def _refusals_exit(args: argparse.Namespace, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Runs ``work`` with a pool of the configured database; a refusal (unknown id, bad URL, no secret key) exits 1 saying why."""

    try:
        return with_database(work, args.settings.database)
    except DomainError as e:
        print(e.message, file=sys.stderr)
        raise SystemExit(1) from None


def _events_text(subscription: storage.Subscription) -> str:
    return "every event" if subscription.event_types is None else ",".join(subscription.event_types)


def _print_dead_letters(letters: list[storage.DeadLetter], total: int) -> None:
    print(f"{'subscription':<20} {'event':>9} {'type':<16} {'attempts':>8} {'dead at':<20} {'retry':<5} last error")
    for letter in letters:
        print(
            f"{letter.subscription_id:<20} {letter.position:>9} {letter.event_type:<16} {letter.attempts:>8} "
            f"{letter.dead_at:%Y-%m-%d %H:%M:%S}  {'yes' if letter.retry_requested else 'no':<5} {letter.last_error}"
        )
    if total > len(letters):
        print(f"... and {total - len(letters)} more (GET /api/webhooks/ID/dead-letters pages through them all)")
