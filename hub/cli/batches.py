"""``giftcard cards issue``: a batch of native cards, their redemption codes written once, to a file.

Thin calls into ``ledger.application.bulk_issue``, which does the work. The batch id is printed first: an
interrupted run (Ctrl-C, a crash, a lost connection) is finished by running the same command with
``--batch-id``, which issues only the missing cards and never one twice (see ``ledger.application.bulk_issue`` for why no code can be lost).

Exit codes: 0 every card of the batch exists and its code is in the output; 1 some cards exist
whose codes are not in this output (listed: the file of an earlier run holds them, or they are
lost and should be voided); 2 refused (bad argument, batch busy, terms or file not this batch's);
130 interrupted (resume it).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import asyncpg
from tqdm import tqdm

from hub.cli import arguments
from ledger.application.bulk_issue import (
    BATCH_CARDS_MAX,
    CHUNK_CARDS_DEFAULT,
    CHUNK_CARDS_MAX,
    BatchDefaults,
    BatchOutcome,
    BatchRequest,
    BatchTerms,
    BulkIssuer,
    check_batch_id,
    new_batch_id,
)
from ledger.application.commands import Ledger, utc_now
from ledger.domain.errors import DomainError
from ledger.eventstore.store import EventStore
from ledger.postgres.database import with_database
from ledger.postgres.instance_keys import instance_key

EXIT_OK, EXIT_CODES_LOST, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130
CHUNK_PAUSE_S_MAX = 60.0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Adds the ``cards`` command group (``cards issue``)."""
    group = commands.add_parser("cards", help="native gift cards in bulk")
    sub = group.add_subparsers(dest="cards_command", required=True)
    issue = sub.add_parser(
        "issue",
        help="issue a batch of cards; their codes go to --output only, once (resumable with --batch-id)",
    )
    issue.add_argument(
        "--count", type=arguments.bounded_int(1, BATCH_CARDS_MAX), required=True, help="cards in the batch"
    )
    issue.add_argument(
        "--value", type=arguments.amount, required=True, help="loaded on each card, major units (0: empty)"
    )
    issue.add_argument("--currency", required=True, help="ISO 4217 code, e.g. USD")
    issue.add_argument(
        "--expires", type=arguments.instant, help="expiringDate, ISO 8601 (default: the configured validity)"
    )
    issue.add_argument("--caption", help="caption of every card (default 'Gift card')")
    issue.add_argument("--profile-id", help="owner of every card (default: the batch id)")
    issue.add_argument("--batch-id", type=_batch_id, help="resume this batch (default: a new one, printed first)")
    issue.add_argument("--output", type=Path, required=True, help="CSV file the codes are written to")
    issue.add_argument(
        "--chunk-cards",
        type=arguments.bounded_int(1, CHUNK_CARDS_MAX),
        default=CHUNK_CARDS_DEFAULT,
        help=f"cards per transaction (default {CHUNK_CARDS_DEFAULT})",
    )
    issue.add_argument(
        "--chunk-pause-s",
        type=arguments.bounded_float(0.0, CHUNK_PAUSE_S_MAX),
        default=0.0,
        help="pause between chunks, to leave a busy database to live traffic (default 0)",
    )
    issue.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    issue.set_defaults(run=issue_command)


# ---- the command -------------------------------------------------------------------------------


def issue_command(args: argparse.Namespace) -> int:
    if not args.output.parent.is_dir():
        print(f"refused: {args.output.parent} is not a directory to write {args.output.name} in", file=sys.stderr)
        return EXIT_REFUSED
    settings = args.settings
    batch_id = args.batch_id or new_batch_id(utc_now())
    # First, before anything can fail: whoever runs this needs the id to resume an interrupted run.
    print(f"batch {batch_id} (to resume an interrupted run: the same command with --batch-id {batch_id})", flush=True)
    request = BatchRequest(
        batch_id=batch_id,
        count=args.count,
        value=args.value,
        currency=args.currency,
        expiring_date=args.expires,
        caption=args.caption,
        profile_id=args.profile_id,
    )
    defaults = BatchDefaults(
        currency=args.currency, expiring_date=utc_now() + timedelta(days=settings.default_validity_days)
    )
    progress = Progress()
    try:
        outcome = with_database(lambda pool: _issue(pool, request, defaults, args, progress), settings.database)
    except DomainError as e:
        print(f"refused: {e.message}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"interrupted: run the same command with --batch-id {batch_id} to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    _report(outcome, args, progress.elapsed_s())
    return EXIT_CODES_LOST if outcome.lost else EXIT_OK


class Progress:
    """The bar (only on a terminal: in a log or a pipe it would be noise) and the issuing time."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.started = time.perf_counter()

    def start(self, terms: BatchTerms, missing: int) -> None:
        self.started = time.perf_counter()  # from here on: connecting and checking the batch excluded
        self.bar = tqdm(total=missing, unit="card", desc="issuing", disable=not sys.stderr.isatty())

    def advance(self, cards: int) -> None:
        if self.bar is not None:
            self.bar.update(cards)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def _issue(
    pool: asyncpg.Pool, request: BatchRequest, defaults: BatchDefaults, args: argparse.Namespace, progress: Progress
) -> BatchOutcome:
    ledger = Ledger(EventStore(pool), await instance_key(pool, "redemption-codes", args.settings.secret_key))
    return await BulkIssuer(ledger, chunk_cards=args.chunk_cards).issue_to_file(
        request,
        defaults,
        args.output,
        metadata={"actor": f"cli:{_user()}", "route": "giftcard cards issue", "batchId": request.batch_id},
        on_start=progress.start,
        on_chunk=progress.advance,
        chunk_pause_s=args.chunk_pause_s,
    )


def _report(outcome: BatchOutcome, args: argparse.Namespace, elapsed_s: float) -> None:
    terms = outcome.terms
    issued = outcome.issued_now
    rate = issued / elapsed_s if elapsed_s > 0 else 0.0
    lost = [{"n": n, "cardId": card_id} for n, card_id in outcome.lost]
    if args.json:
        summary = {
            "batchId": terms.batch_id,
            "count": terms.count,
            "issuedNow": issued,
            "alreadyIssued": outcome.already_issued,
            "codesLost": lost,
            "output": str(args.output),
            "seconds": round(elapsed_s, 3),
            "cardsPerSecond": round(rate, 1),
        }
        print(json.dumps(summary))
    else:
        print(
            f"batch {terms.batch_id}: {issued} card(s) issued now, {outcome.already_issued} already existed; "
            f"codes in {args.output} ({rate:.0f} cards/s)"
        )
    for entry in lost:
        print(
            f"card {entry['n']} ({entry['cardId']}): issued, code lost (not in {args.output}): "
            "find it in an earlier run's file, or void the card",
            file=sys.stderr,
        )


# ---- argument types --------------------------------------------------------------------------


def _batch_id(value: str) -> str:
    try:
        return check_batch_id(value)
    except DomainError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's user may have no name
        return "unknown"
