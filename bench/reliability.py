"""Reliability under crashes: a Debit load while the hub is SIGKILLed and restarted, over and over.

The scenario of tests/test_faults.py at a larger scale. ``giftcard serve`` runs as a subprocess
on 127.0.0.1 against a fresh database; the bench creates cards, credits them, then sends Debits
(each with a unique requestId) with bounded concurrency. Whenever another slice of the load has
been acknowledged, the hub is SIGKILLed and restarted on the same port. Clients retry every
unanswered request with the same requestId and payload until it is answered. Then the events
table is audited:

lost         acknowledged Debits whose transaction is not in the events table (must be 0)
duplicated   requestIds with more than one Debited event on their card (must be 0)
replayed     Debits committed before a kill but unanswered when it hit, answered by a retry
             (the idempotency path the kills exercise; a lower bound, see ``replayed_after_kills``)

Last, a fixed set of bad Debits (zero, negative, NaN, too precise, huge, wrong types, not JSON,
unknown cards...) goes to the restarted hub: each must be a 4xx and write nothing.

    python -m bench.reliability                                   # embedded PostgreSQL, ~35 s
    python -m bench.reliability --database-url postgresql://postgres@127.0.0.1:5432/postgres
    python -m bench.reliability --json bench/results/reliability.json

Figures are appended to docs/reliability.md with the command and date (``--no-doc`` skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.arguments import add_database_url
from ledger.postgres.database import database_named
from tests.debit_load import (
    MINOR_PER_MAJOR,
    Debit,
    RetryPolicy,
    acknowledged_count,
    audit,
    broken_chains,
    expected_balances,
    plan_debits,
    send_all,
    until_acknowledged,
)
from tests.hub_process import PROVIDER_HEADERS, HubProcess, NativeClient
from tests.postgres_faults import DisposablePostgres

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
CARD_CREDIT = Decimal("100000.00")  # far above what any run debits: every Debit must succeed
DEBIT_VALUES = tuple(Decimal(v) for v in ("0.01", "0.37", "1.25", "2.50", "0.99"))
TIME_LIMIT_S = 110.0  # the whole run, setup and audit included, stays under two minutes
SETUP_CONCURRENCY = 16
AUDIT_RESERVE_S = 10.0  # of --time-limit, kept for the audit after the load


@dataclass
class Figures:
    requests_sent: int
    acknowledged: int
    unanswered: int  # never answered before the deadline: not lost (nothing was promised), but reported
    lost: int
    duplicated: int
    unexpected_events: int
    restarts: int
    replayed_after_kills: int
    attempts: int
    attempts_cut_off: int
    attempts_503: int
    attempts_timed_out: int
    server_errors: int
    balances_match: bool
    chains_intact: bool
    load_seconds: float
    debits_per_second: float
    bad_inputs_sent: int = 0
    bad_inputs_refused_4xx: int = 0
    bad_inputs_5xx: int = 0
    bad_inputs_events_written: int = 0

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.unexpected_events == 0
            and self.unanswered == 0
            and self.server_errors == 0
            and self.balances_match
            and self.chains_intact
            and self.bad_inputs_5xx == 0
            and self.bad_inputs_events_written == 0
        )


# ---- the database ----------------------------------------------------------------------------


@asynccontextmanager
async def fresh_database(server_url: str | None) -> AsyncIterator[str]:
    """A new database on the given server (dropped after), or on an embedded server of its own."""
    embedded = None
    if server_url is None:
        embedded = await asyncio.to_thread(DisposablePostgres)
        server_url = embedded.url
    name = f"giftcard_reliability_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"create database {name}")
        yield database_named(server_url, name)
    finally:
        await admin.execute(f"drop database if exists {name} with (force)")
        await admin.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


# ---- the load and the kills ------------------------------------------------------------------


async def funded_cards(client: NativeClient, count: int) -> list[str]:
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(n: int) -> str:
        async with gate:
            card_id = await client.create_card(f"reliability-{uuid.uuid4().hex}")
            await client.credit(card_id, CARD_CREDIT, "load")
            return card_id

    return list(await asyncio.gather(*(one(n) for n in range(count))))


@dataclass
class Kill:
    position: int  # the last event committed when the hub died
    unanswered: set[str]  # requestIds without an answer at that moment


async def kill_and_restart_repeatedly(
    hub: HubProcess, pool: asyncpg.Pool, debits: Sequence[Debit], restarts: int, deadline: float
) -> list[Kill]:
    """Kills the hub each time another 1/(restarts+1) of the load is acknowledged."""
    kills = []
    for n in range(1, restarts + 1):
        await until_acknowledged(debits, len(debits) * n // (restarts + 1), deadline)
        await hub.kill()
        unanswered = {d.request_id for d in debits if not d.acknowledged}
        kills.append(Kill(await pool.fetchval("select coalesce(max(position), 0) from events"), unanswered))
        await hub.start()
    return kills


async def replayed_after_kills(pool: asyncpg.Pool, debits: Sequence[Debit], kills: Sequence[Kill]) -> int:
    """Debits already committed when a kill cut their request off: only the retry answered them.
    A lower bound: a backend may still commit a statement it had received after the position
    was read."""
    cut_off = {d.request_id for d in debits if d.cut_off}
    rows = await pool.fetch(
        "select data->>'request_id' as request_id, position from events where data->>'request_id' = any($1::text[])",
        list(cut_off),
    )
    return sum(any(row["request_id"] in k.unanswered and row["position"] <= k.position for k in kills) for row in rows)


# ---- bad inputs ------------------------------------------------------------------------------


def bad_debits(card_id: str) -> list[tuple[str, bytes | None, Any]]:
    """(path, raw body, JSON body) triples of Debits the service must refuse with a 4xx."""

    def debit(**changes: Any) -> dict[str, Any]:
        body = {"operation": "Debit", "value": 1, "description": "bad", "requestId": f"bad-{uuid.uuid4().hex}"}
        body.update(changes)
        return {k: v for k, v in body.items() if v is not None}

    path = f"/native/giftcards/{card_id}/transactions"
    unknown = f"/native/giftcards/{uuid.uuid4()}/transactions"
    return [
        (path, None, debit(value=0)),
        (path, None, debit(value=-1)),
        (path, None, debit(value="NaN")),
        (path, None, debit(value=1.001)),
        (path, None, debit(value=1e20)),
        (path, None, debit(value="abc")),
        (path, None, debit(value=float(CARD_CREDIT * 10))),  # more than the card holds: 422
        (path, None, debit(operation="Refund")),
        (path, None, debit(requestId=None)),
        (path, None, debit(description="nul \x00 byte")),
        (path, None, debit(requestId=123)),
        (path, b'{"operation": "Debit", "value": NaN, "requestId": "x"}', None),
        (path, b'{"operation": "Debit", "value": 1e999999, "requestId": "x"}', None),
        (path, b"not json", None),
        (path, b"[1, 2, 3]", None),
        (path, b"", None),
        (unknown, None, debit()),
        ("/native/giftcards/not-a-card/transactions", None, debit()),
    ]


async def send_bad_inputs(session: aiohttp.ClientSession, hub: HubProcess, card_ids: Sequence[str]) -> Counter:
    statuses: Counter = Counter()
    for card_id in card_ids:
        for path, raw, body in bad_debits(card_id):
            headers = {**PROVIDER_HEADERS, "Content-Type": "application/json"}
            async with session.post(hub.base_url + path, data=raw, json=body, headers=headers) as response:
                await response.read()
                statuses[response.status] += 1
    return statuses


# ---- the run ---------------------------------------------------------------------------------


async def load_with_kills(
    client: NativeClient, hub: HubProcess, pool: asyncpg.Pool, debits: Sequence[Debit], args, deadline: float
) -> tuple[list[Kill], float]:
    """Sends every Debit while the hub is killed and restarted; returns the kills and the seconds."""
    started = time.monotonic()
    load_deadline = deadline - AUDIT_RESERVE_S
    async with asyncio.timeout(max(1.0, deadline - asyncio.get_running_loop().time())), asyncio.TaskGroup() as group:
        group.create_task(
            send_all([client], debits, concurrency=args.concurrency, policy=RetryPolicy(), deadline=load_deadline)
        )
        kills = group.create_task(kill_and_restart_repeatedly(hub, pool, debits, args.restarts, load_deadline))
    return kills.result(), time.monotonic() - started


async def run(args: argparse.Namespace) -> Figures:
    deadline = asyncio.get_running_loop().time() + args.time_limit
    log_dir = Path(tempfile.mkdtemp(prefix="giftcard-reliability-"))
    figures = None
    async with (
        fresh_database(args.database_url) as database_url,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
        hub = HubProcess(database_url, log_dir / "hub.log")
        try:
            await hub.start()
            client = NativeClient(session, hub.base_url)
            cards = await funded_cards(client, args.cards)
            debits = plan_debits(cards, args.debits, DEBIT_VALUES)
            kills, load_seconds = await load_with_kills(client, hub, pool, debits, args, deadline)
            figures = await audited(pool, client, debits, cards, kills, load_seconds)
            if not args.no_bad_inputs:
                await add_bad_inputs(figures, session, hub, pool, cards[: args.bad_input_cards])
        finally:
            await hub.stop()
            await pool.close()
            # The hub's log is kept only when something went wrong: it is where the why is.
            if figures is not None and figures.passed:
                shutil.rmtree(log_dir, ignore_errors=True)
            else:
                print(f"hub log kept: {hub.log_path}", file=sys.stderr)
    return figures


async def audited(
    pool: asyncpg.Pool,
    client: NativeClient,
    debits: Sequence[Debit],
    cards: Sequence[str],
    kills: Sequence[Kill],
    load_seconds: float,
) -> Figures:
    credits = {card_id: int(CARD_CREDIT * MINOR_PER_MAJOR) for card_id in cards}
    found = await audit(pool, debits, credits)
    served = {card_id: int(await client.balance(card_id) * MINOR_PER_MAJOR) for card_id in cards}
    acknowledged = acknowledged_count(debits)
    return Figures(
        requests_sent=len(debits),
        acknowledged=acknowledged,
        unanswered=sum(d.status is None for d in debits),
        lost=len(found.lost),
        duplicated=len(found.duplicated),
        unexpected_events=len(found.unexpected),
        restarts=len(kills),
        replayed_after_kills=await replayed_after_kills(pool, debits, kills),
        attempts=sum(d.attempts for d in debits),
        attempts_cut_off=sum(d.cut_off for d in debits),
        attempts_503=sum(d.unavailable for d in debits),
        attempts_timed_out=sum(d.timeouts for d in debits),
        server_errors=sum(len(d.server_errors) for d in debits),
        balances_match=served == found.balance_from_events == expected_balances(debits, credits),
        chains_intact=not await broken_chains(pool, cards),
        load_seconds=round(load_seconds, 2),
        debits_per_second=round(acknowledged / load_seconds, 1) if load_seconds else 0.0,
    )


async def add_bad_inputs(
    figures: Figures, session: aiohttp.ClientSession, hub: HubProcess, pool: asyncpg.Pool, cards: Sequence[str]
) -> None:
    before = await pool.fetchval("select count(*) from events")
    statuses = await send_bad_inputs(session, hub, cards)
    figures.bad_inputs_sent = sum(statuses.values())
    figures.bad_inputs_refused_4xx = sum(n for status, n in statuses.items() if 400 <= status < 500)
    figures.bad_inputs_5xx = sum(n for status, n in statuses.items() if status >= 500)
    figures.bad_inputs_events_written = await pool.fetchval("select count(*) from events") - before


# ---- reporting -------------------------------------------------------------------------------


def command_line() -> str:
    return shlex.join(["python", "-m", "bench.reliability", *sys.argv[1:]])


def text_report(figures: Figures) -> str:
    f = figures
    lines = [
        f"requests sent      {f.requests_sent}",
        f"acknowledged       {f.acknowledged}",
        f"lost               {f.lost}   (must be 0)",
        f"duplicated         {f.duplicated}   (must be 0)",
        f"restarts           {f.restarts}   (SIGKILL, then restart on the same port)",
        f"unanswered         {f.unanswered}   (at the deadline; must be 0)",
        f"replayed           {f.replayed_after_kills}   (committed before a kill, answered by a retry)",
        f"attempts           {f.attempts}   (cut off {f.attempts_cut_off}, 503 {f.attempts_503}, "
        f"timed out {f.attempts_timed_out}, other 5xx {f.server_errors})",
        f"balances match     {f.balances_match}; hash chains intact {f.chains_intact}",
        f"load               {f.load_seconds} s, {f.debits_per_second} acknowledged Debits/s with the restarts",
    ]
    if f.bad_inputs_sent:
        lines.append(
            f"bad inputs         {f.bad_inputs_sent} sent, {f.bad_inputs_refused_4xx} refused 4xx, "
            f"{f.bad_inputs_5xx} 5xx (must be 0), {f.bad_inputs_events_written} events written (must be 0)"
        )
    lines.append("PASSED" if f.passed else "FAILED")
    return "\n".join(lines)


def append_to_doc(doc: Path, figures: Figures, args: argparse.Namespace, date: str) -> None:
    if not doc.exists():
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(DOC_HEADER)
    section = (
        f"\n## {date}\n\n"
        f"`{command_line()}`: {args.cards} cards, concurrency {args.concurrency}, {os.cpu_count()} CPUs, "
        f"PostgreSQL {'at --database-url' if args.database_url else 'embedded'}.\n\n"
        f"```\n{text_report(figures)}\n```\n"
    )
    with doc.open("a") as out:
        out.write(section)


DOC_HEADER = """# Reliability

What `python -m bench.reliability` measured: a load of Debits while the hub is SIGKILLed and
restarted several times, clients retrying every unanswered request with the same requestId
(see the module's docstring and tests/test_faults.py). `lost` and `duplicated` are read from the
events table and must be 0; `replayed` counts Debits that were committed when a kill cut their
request off and were answered by the retry, i.e. how often the idempotency path was exercised.
Each run appends a section below.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_database_url(parser, "a PostgreSQL server (the bench creates and drops a database of its own on it)")
    parser.add_argument("--cards", type=int, default=100, help="cards the load spreads over (%(default)s)")
    parser.add_argument("--debits", type=int, default=10000, help="Debits sent (%(default)s)")
    parser.add_argument("--restarts", type=int, default=8, help="SIGKILL + restart cycles (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (%(default)s)")
    parser.add_argument("--bad-input-cards", type=int, default=5, help="cards the bad inputs aim at (%(default)s)")
    parser.add_argument("--no-bad-inputs", action="store_true", help="skip the bad-input phase")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="bound on setup + load (%(default)s s)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file the figures are appended to")
    parser.add_argument("--no-doc", action="store_true", help="do not append to --doc")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    figures = asyncio.run(run(args))
    print(text_report(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "reliability", "command": command_line(), "date": date, **asdict(figures)}
        args.json.write_text(json.dumps({**payload, "passed": figures.passed}, indent=2) + "\n")
    if not args.no_doc:
        append_to_doc(args.doc, figures, args, date)
    return 0 if figures.passed else 1


if __name__ == "__main__":
    sys.exit(main())
