"""Failover: how long a lost primary costs, and that it costs nothing acknowledged.

Each round builds a fresh cluster on loopback ports (a primary and its synchronous standby, or two
nodes under Patroni with etcd), creates a database, starts ``giftcard serve`` with the multi-host
URL, funds cards, and sends Debits at 16 connections; clients retry every request that was not
answered, or answered 503, with the same requestId. After a few hundred Debits are acknowledged
the primary's machine is lost: its postmaster and every child (and, under Patroni, its Patroni)
are SIGKILLed. With ``promote`` the standby is then promoted by ``pg_ctl promote``; with
``patroni`` Patroni notices and promotes it. Per round:

kill to first 2xx   from the kill to the first Debit answered 200 whose attempt began after it
lost                acknowledged Debits missing from the new primary (must be 0)
applied twice       requestIds with more than one Debited event (must be 0)
500s                answers 5xx other than 503 (must be 0)

    python -m bench.failover                       # 10 rounds of each manager
    python -m bench.failover --manager promote --rounds 3 --no-doc

Figures are appended to docs/reliability.md with the command and date (``--no-doc`` skips it).
Targets: kill to first 2xx under 5 s with ``promote``, under 15 s with Patroni.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Protocol

import aiohttp
import asyncpg

from tests.debit_load import Debit, RetryPolicy, audit, plan_debits, send_all, until_acknowledged
from tests.hub_process import HubProcess, NativeClient, TimedClient
from tests.pg_cluster import ReplicatedPair
from tests.postgres_faults import create_database

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
DATABASE = "giftcard"
CARDS = 20
CARD_CREDIT = Decimal("100000.00")  # far above what a round debits: every Debit must succeed
DEBIT_VALUES = tuple(Decimal(v) for v in ("0.01", "0.37", "1.25", "2.50", "0.99"))
CONCURRENCY = 16
LOAD_TIMEOUT_S = 120.0
TARGET_S = {"promote": 5.0, "patroni": 15.0}


class Cluster(Protocol):
    def start(self) -> object: ...
    def url(self, database: str) -> str: ...
    def primary_url(self, database: str) -> str: ...
    def lose_primary(self) -> float: ...
    def new_primary_url(self, database: str) -> str: ...
    def stop(self) -> None: ...


class PromotedPair:
    """A primary and its synchronous standby; the operator promotes by hand (``pg_ctl promote``)."""

    def __init__(self) -> None:
        self.pair = ReplicatedPair()

    def start(self) -> PromotedPair:
        self.pair.start()
        return self

    def url(self, database: str) -> str:
        return self.pair.url(database)

    def primary_url(self, database: str) -> str:
        return self.pair.primary.url(database)

    def lose_primary(self) -> float:
        return self.pair.fail_over()

    def new_primary_url(self, database: str) -> str:
        return self.pair.standby.url(database)

    def stop(self) -> None:
        self.pair.stop()


class PatroniManaged:
    """Two nodes under Patroni with one etcd: Patroni notices the lost leader and promotes."""

    def __init__(self) -> None:
        from tests.patroni_cluster import PatroniCluster  # only this manager needs Patroni

        self.cluster = PatroniCluster()

    def start(self) -> PatroniManaged:
        self.cluster.start()
        return self

    def url(self, database: str) -> str:
        return self.cluster.url(database)

    def primary_url(self, database: str) -> str:
        return self.cluster.leader().url(database)

    def lose_primary(self) -> float:
        self.lost, killed_at = self.cluster.kill_leader()
        return killed_at

    def new_primary_url(self, database: str) -> str:
        return self.cluster.wait_for_leader(exclude=self.lost).url(database)

    def stop(self) -> None:
        self.cluster.stop()


MANAGERS: dict[str, Callable[[], Cluster]] = {"promote": PromotedPair, "patroni": PatroniManaged}


@dataclass
class Round:
    manager: str
    kill_to_first_2xx_s: float | None
    acknowledged: int
    sent: int
    lost: int
    applied_twice: int
    server_errors: int
    unanswered: int
    attempts_503: int

    @property
    def passed(self) -> bool:
        return (
            self.lost == self.applied_twice == self.server_errors == self.unanswered == 0
            and self.kill_to_first_2xx_s is not None
        )


async def funded_cards(client: NativeClient) -> list[str]:
    cards = [await client.create_card(f"failover-{uuid.uuid4().hex}") for _ in range(CARDS)]
    for card_id in cards:
        await client.credit(card_id, CARD_CREDIT, "load")
    return cards


async def lose_primary_when(cluster: Cluster, debits: Sequence[Debit], at_acknowledged: int, deadline: float) -> float:
    """Returns when the primary was killed: the pause Patroni or the operator take to promote follows."""
    await until_acknowledged(debits, at_acknowledged, deadline)
    return await asyncio.to_thread(cluster.lose_primary)


async def one_round(manager: str, debits_count: int, at_acknowledged: int, folder: Path) -> Round:
    cluster = await asyncio.to_thread(lambda: MANAGERS[manager]().start())
    hub = None
    try:
        await create_database(cluster.primary_url("postgres"), DATABASE)
        hub = HubProcess(cluster.url(DATABASE), folder / f"hub-{manager}-{uuid.uuid4().hex[:6]}.log")
        await hub.start()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            client = TimedClient(session, hub.base_url)
            cards = await funded_cards(client)
            client.successes.clear()
            debits = plan_debits(cards, debits_count, DEBIT_VALUES)
            deadline = asyncio.get_running_loop().time() + LOAD_TIMEOUT_S
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    send_all([client], debits, concurrency=CONCURRENCY, policy=RetryPolicy(), deadline=deadline)
                )
                killing = group.create_task(lose_primary_when(cluster, debits, at_acknowledged, deadline))
            killed_at = killing.result()
        first_success = client.first_success_sent_after(killed_at)
        pool = await asyncpg.create_pool(
            await asyncio.to_thread(cluster.new_primary_url, DATABASE), min_size=1, max_size=2
        )
        try:
            found = await audit(pool, debits, dict.fromkeys(cards, int(CARD_CREDIT * 100)))
        finally:
            await pool.close()
        return Round(
            manager=manager,
            kill_to_first_2xx_s=None if first_success is None else round(first_success - killed_at, 3),
            acknowledged=found.acknowledged,
            sent=len(debits),
            lost=len(found.lost),
            applied_twice=len(found.duplicated) + len(found.unexpected),
            server_errors=sum(len(d.server_errors) for d in debits),
            unanswered=sum(d.status is None for d in debits),
            attempts_503=sum(d.unavailable for d in debits),
        )
    finally:
        if hub is not None:
            await hub.stop()
        await asyncio.to_thread(cluster.stop)


def report(rounds: Sequence[Round]) -> str:
    lines = ["| manager | round | kill to first 2xx | acknowledged | lost | applied twice | 500s | 503 answers |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for manager in dict.fromkeys(r.manager for r in rounds):
        mine = [r for r in rounds if r.manager == manager]
        for n, r in enumerate(mine, start=1):
            took = "never" if r.kill_to_first_2xx_s is None else f"{r.kill_to_first_2xx_s:.2f} s"
            lines.append(
                f"| {manager} | {n} | {took} | {r.acknowledged}/{r.sent} | {r.lost} | {r.applied_twice} "
                f"| {r.server_errors} | {r.attempts_503} |"
            )
    lines.append("")
    for manager in dict.fromkeys(r.manager for r in rounds):
        times = [r.kill_to_first_2xx_s for r in rounds if r.manager == manager and r.kill_to_first_2xx_s is not None]
        if times:
            lines.append(
                f"{manager}: kill to first 2xx median {statistics.median(times):.2f} s, max {max(times):.2f} s "
                f"(target < {TARGET_S[manager]:g} s)"
            )
    lines.append("PASSED" if all(r.passed for r in rounds) and met_targets(rounds) else "FAILED")
    return "\n".join(lines)


def met_targets(rounds: Sequence[Round]) -> bool:
    return all(r.kill_to_first_2xx_s is not None and r.kill_to_first_2xx_s < TARGET_S[r.manager] for r in rounds)


def command_line() -> str:
    return shlex.join(["python", "-m", "bench.failover", *sys.argv[1:]])


def append_to_doc(doc: Path, text: str, date: str) -> None:
    with doc.open("a") as out:
        out.write(f"\n## Failover, {date}\n\n`{command_line()}`\n\n{text}\n")


async def run(args: argparse.Namespace) -> list[Round]:
    rounds = []
    folder = Path(tempfile.mkdtemp(prefix="giftcard-failover-bench-"))
    for manager in args.manager:
        for n in range(args.rounds):
            found = await one_round(manager, args.debits, args.kill_after, folder)
            print(f"{manager} round {n + 1}: {found}", file=sys.stderr)
            rounds.append(found)
    return rounds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--manager", action="append", choices=sorted(MANAGERS), help="promote, patroni, or both (the default)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="rounds per manager (%(default)s)")
    parser.add_argument("--debits", type=int, default=1500, help="Debits per round (%(default)s)")
    parser.add_argument("--kill-after", type=int, default=300, help="acknowledged Debits before the kill (%(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every round here")
    parser.add_argument("--no-doc", action="store_true", help=f"do not append to {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    args.manager = args.manager or ["promote", "patroni"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    rounds = asyncio.run(run(args))
    text = report(rounds)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "failover", "command": command_line(), "date": date}
        args.json.write_text(json.dumps({**payload, "rounds": [asdict(r) for r in rounds]}, indent=2) + "\n")
    if not args.no_doc:
        append_to_doc(DOC, text, date)
    return 0 if all(r.passed for r in rounds) and met_targets(rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
