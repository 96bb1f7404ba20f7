"""Faults, with real processes and a real PostgreSQL, on 127.0.0.1 only.

1. The hub is SIGKILLed in the middle of a load of Debits and restarted; clients retry every
   unanswered request with the same requestId: every Debit ends up applied exactly once.
2. PostgreSQL restarts (fast or as a crash) or cuts the service's connections during a load:
   requests in flight get a 503 with a clear message or succeed, never a 500 nor a hang; the
   pool reconnects by itself and nothing is half-written.
3. Several hub processes (two ``serve`` processes, or ``serve --workers 2``) on one database, one
   load on the same cards: no double spend, no lost update, contiguous and valid hash chains.
4. A connection cut right after a command committed (in its optional snapshot) does not turn the
   committed command's answer into an error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from ledger.application.commands import Ledger
from ledger.eventstore.store import EventStore
from ledger.postgres.database import database_named
from tests.cards import issue
from tests.debit_load import (
    MINOR_PER_MAJOR,
    Debit,
    RetryPolicy,
    audit,
    broken_chains,
    expected_balances,
    plan_debits,
    send_all,
    send_until_answered,
    until_acknowledged,
)
from tests.hub_process import HubProcess, NativeClient
from tests.postgres_faults import DisposablePostgres, create_database, terminate_backends

pytestmark = pytest.mark.also_on_citus

SCENARIO_TIMEOUT_S = 60  # a hang fails the test instead of stalling the suite
LOAD_TIMEOUT_S = 45
DEBIT_VALUES = tuple(Decimal(v) for v in ("0.01", "0.37", "1.25", "2.50", "0.99"))  # distinct sums per card

HubFactory = Callable[..., Awaitable[HubProcess]]


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def start_hub(tmp_path: Path) -> AsyncIterator[HubFactory]:
    """Starts ``giftcard serve`` processes; every one is stopped after the test, even on failure."""
    hubs: list[HubProcess] = []

    async def start(database_url: str, **options) -> HubProcess:
        hub = HubProcess(database_url, tmp_path / f"hub-{len(hubs)}.log", **options)
        hubs.append(hub)
        await hub.start()
        return hub

    yield start
    for hub in hubs:
        await hub.stop()


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[DisposablePostgres]:
    """A PostgreSQL for the tests that restart it, so the session-wide server is never disturbed."""
    server = DisposablePostgres()
    try:
        yield server
    finally:
        server.stop()


# ---- helpers ---------------------------------------------------------------------------------


async def funded_cards(client: NativeClient, count: int, credit: Decimal) -> list[str]:
    cards = [await client.create_card(f"fault-{uuid.uuid4().hex}") for _ in range(count)]
    for card_id in cards:
        await client.credit(card_id, credit, "load")
    return cards


LOAD_CREDIT = Decimal("100.00")  # every card of a load starts with this much


async def funded_load(
    client: NativeClient,
    card_count: int,
    debit_count: int,
    values: Sequence[Decimal] = DEBIT_VALUES,
    *,
    targets: int = 1,
) -> tuple[list[str], list[Debit]]:
    """The start of every load scenario: cards credited LOAD_CREDIT each, and the Debits planned
    over them (see plan_debits). The ledger is later checked against credits_of(cards, LOAD_CREDIT)."""
    cards = await funded_cards(client, card_count, LOAD_CREDIT)
    return cards, plan_debits(cards, debit_count, values, targets=targets)


def credits_of(cards: Sequence[str], credit: Decimal) -> dict[str, int]:
    return {card_id: int(credit * MINOR_PER_MAJOR) for card_id in cards}


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def balances_over_http(client: NativeClient, cards: Sequence[str]) -> dict[str, int]:
    return {card_id: int(await client.balance(card_id) * MINOR_PER_MAJOR) for card_id in cards}


def summary(debits: Sequence[Debit]) -> str:
    """Final statuses and the faults met on the way, for assertion messages."""
    statuses = Counter(d.status for d in debits)
    return (
        f"final statuses {dict(statuses)}; cut off {sum(d.cut_off for d in debits)}, "
        f"503 {sum(d.unavailable for d in debits)}, timeouts {sum(d.timeouts for d in debits)}"
    )


async def send_during(
    fault: Callable[[float], Awaitable[object]],
    clients: Sequence[NativeClient],
    debits: Sequence[Debit],
    *,
    concurrency: int,
    scenario_timeout_s: float = SCENARIO_TIMEOUT_S,
    load_timeout_s: float = LOAD_TIMEOUT_S,
) -> None:
    """The load every fault scenario runs: the Debits sent with retries while ``fault(deadline)``
    strikes. Both share the load's deadline, and a hang fails the test instead of stalling the suite."""
    async with asyncio.timeout(scenario_timeout_s):
        deadline = deadline_in(load_timeout_s)
        async with asyncio.TaskGroup() as group:
            group.create_task(
                send_all(clients, debits, concurrency=concurrency, policy=RetryPolicy(), deadline=deadline)
            )
            group.create_task(fault(deadline))


def assert_every_debit_came_through(debits: Sequence[Debit]) -> None:
    """What the clients saw of a fault, the same verdict wherever the fault struck: never a 500,
    never a request left hanging, and in the end (retries included) every Debit acknowledged."""
    assert not any(d.server_errors for d in debits), [d.server_errors[0] for d in debits if d.server_errors][:3]
    assert not any(d.timeouts for d in debits), summary(debits)
    assert all(d.acknowledged for d in debits), summary(debits)


async def assert_ledger_consistent(
    pool: asyncpg.Pool, client: NativeClient, debits: Sequence[Debit], credits: dict[str, int]
) -> None:
    """From the database: each acknowledged Debit once, with the transaction the client was given,
    nothing else; balances (as the service reports them) follow from the events; chains intact."""
    found = await audit(pool, debits, credits)
    assert found.lost == [], f"acknowledged but not recorded: {found.lost[:10]}"
    assert found.duplicated == [], f"applied twice: {found.duplicated[:10]}"
    assert found.unexpected == [], f"recorded but never acknowledged: {found.unexpected[:10]}"
    assert found.events == found.acknowledged
    assert await balances_over_http(client, list(credits)) == found.balance_from_events
    assert found.balance_from_events == expected_balances(debits, credits)
    assert await broken_chains(pool, list(credits)) == []


async def assert_ledger_consistent_at(
    database_url: str, client: NativeClient, debits: Sequence[Debit], credits: dict[str, int]
) -> None:
    """assert_ledger_consistent on a pool of its own: after a fault, the database to check is one the
    test reaches by URL (its own server, the promoted standby), not the session's pool."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await assert_ledger_consistent(pool, client, debits, credits)
    finally:
        await pool.close()


# ---- 1. the hub is killed mid-load -----------------------------------------------------------


async def kill_and_restart(hub: HubProcess, debits: Sequence[Debit], at_acknowledged: int, deadline: float) -> None:
    await until_acknowledged(debits, at_acknowledged, deadline)
    await hub.kill()
    await hub.start()  # same port: the clients' retries find it again


async def test_sigkill_mid_load_applies_every_debit_exactly_once(database_url, pool, start_hub, http):
    hub = await start_hub(database_url)
    client = NativeClient(http, hub.base_url)
    cards, debits = await funded_load(client, 20, 600)

    await send_during(
        lambda deadline: kill_and_restart(hub, debits, at_acknowledged=200, deadline=deadline),
        [client],
        debits,
        concurrency=64,
    )

    print(summary(debits))
    assert hub.starts == 2
    assert all(d.acknowledged for d in debits), summary(debits)
    assert any(d.cut_off for d in debits), "the kill cut no request off: it landed outside the load"
    assert not any(d.timeouts for d in debits), summary(debits)
    await assert_ledger_consistent(pool, client, debits, credits_of(cards, LOAD_CREDIT))


# ---- 2. PostgreSQL restarts, crashes or cuts connections mid-load ----------------------------


async def inject(fault: str, postgres: DisposablePostgres) -> None:
    if fault == "terminate_backends":
        assert await terminate_backends(postgres.url) > 0
    else:
        # pg_ctl blocks until the server is back; in a thread, the load keeps running meanwhile.
        await asyncio.to_thread(postgres.restart, fault.removeprefix("restart_"))


async def fault_during_load(
    fault: str, postgres: DisposablePostgres, debits: Sequence[Debit], at_acknowledged: int, deadline: float
) -> None:
    await until_acknowledged(debits, at_acknowledged, deadline)
    await inject(fault, postgres)
    # With group commit, few statements are in flight at any instant: a cut that lands between
    # two of them touches no request (the pool just reconnects). Keep cutting while the load
    # lasts, until one lands on a request in flight.
    while fault == "terminate_backends" and not any(d.unavailable for d in debits):
        if all(d.acknowledged for d in debits) or asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(TERMINATE_AGAIN_S)
        await inject(fault, postgres)


def assert_unavailable_answers_are_clear(debits: Sequence[Debit]) -> None:
    for debit in debits:
        for answer in debit.unavailable_answers:
            assert answer.body["error"]["code"] == "unavailable", answer
            assert "database" in answer.body["error"]["message"], answer
            assert int(answer.headers["Retry-After"]) > 0, answer


async def debit_again_without_restart(client: NativeClient, hub: HubProcess, card_id: str) -> Debit:
    """The same process, never restarted, answers reads and writes: its pool reconnected."""
    assert hub.process.returncode is None and hub.starts == 1
    async with client.session.get(hub.base_url + "/readyz") as response:
        assert response.status == 200
    debit = Debit(card_id, f"after-{uuid.uuid4().hex}", Decimal("0.01"))
    await send_until_answered(client, debit, RetryPolicy(attempts_max=1), deadline_in(LOAD_TIMEOUT_S))
    assert debit.acknowledged, debit
    return debit


TERMINATE_AGAIN_S = 0.02


@pytest.mark.parametrize("fault", ["terminate_backends", "restart_fast", "restart_immediate"])
@pytest.mark.single_server("restarts a PostgreSQL of its own; a worker down on a cluster: test_citus")
async def test_postgres_fault_mid_load_gives_503_or_success_and_writes_nothing_half(
    fault, own_postgres, start_hub, http
):
    name = f"fault_{uuid.uuid4().hex[:12]}"
    await create_database(own_postgres.url, name)
    database_url = database_named(own_postgres.url, name)
    hub = await start_hub(database_url)
    client = NativeClient(http, hub.base_url)
    cards, debits = await funded_load(client, 10, 400)

    await send_during(
        lambda deadline: fault_during_load(fault, own_postgres, debits, at_acknowledged=100, deadline=deadline),
        [client],
        debits,
        concurrency=32,
    )

    print(f"{fault}: {summary(debits)}")  # shown with -s or -rP: how hard the fault hit
    assert_every_debit_came_through(debits)
    assert any(d.unavailable for d in debits), f"the fault reached no request in flight: {summary(debits)}"
    assert_unavailable_answers_are_clear(debits)
    assert "unexpected error" not in hub.log_text()
    after = await debit_again_without_restart(client, hub, cards[0])
    await assert_ledger_consistent_at(database_url, client, [*debits, after], credits_of(cards, LOAD_CREDIT))


# ---- 3. several hub processes, one database, the same cards ----------------------------------


async def start_two_processes(start_hub: HubFactory, database_url: str) -> list[HubProcess]:
    """Two ``serve`` processes on two ports: the client alternates, so the split is known."""
    return [await start_hub(database_url), await start_hub(database_url)]


async def start_two_workers(start_hub: HubFactory, database_url: str) -> list[HubProcess]:
    """One ``serve --workers 2``: one port, SO_REUSEPORT, the kernel splits the connections."""
    return [await start_hub(database_url, workers=2)]


@pytest.mark.parametrize("start_hubs", [start_two_processes, start_two_workers], ids=["two-serves", "workers-2"])
async def test_several_hub_processes_never_double_spend_nor_lose_an_update(
    start_hubs, database_url, pool, start_hub, http
):
    hubs = await start_hubs(start_hub, database_url)
    clients = [NativeClient(http, hub.base_url) for hub in hubs]
    cards, debits = await funded_load(clients[0], 5, 600, [Decimal("1.00")], targets=len(clients))

    async with asyncio.timeout(SCENARIO_TIMEOUT_S):
        await send_all(clients, debits, concurrency=200, policy=RetryPolicy(), deadline=deadline_in(LOAD_TIMEOUT_S))

    print(summary(debits))
    assert Counter((d.status, d.code) for d in debits) == {(200, None): 500, (422, "insufficient_funds"): 100}
    assert not any(d.cut_off or d.unavailable or d.timeouts for d in debits), summary(debits)
    for target in range(len(clients)):  # each process on its own port really took part in the race
        assert sum(d.acknowledged for d in debits if d.target == target) > 0
    for client in clients:  # and reads the other's writes: strongly consistent across processes
        assert await balances_over_http(client, cards) == dict.fromkeys(cards, 0)
    await assert_ledger_consistent(pool, clients[-1], debits, credits_of(cards, LOAD_CREDIT))
    for card_id in cards:
        versions = [
            row["version"]
            for row in await pool.fetch("select version from events where stream_id = $1 order by version", card_id)
        ]
        assert versions == list(range(1, 103))  # issued, credited, then exactly 100 Debits


# ---- a connection cut after the commit -------------------------------------------------------


class SnapshotCutOff(EventStore):
    """asyncpg's race after pg_terminate_backend (see hub.errors) cannot be produced on demand: this
    store raises the error asyncpg gives there, in the one write that follows a committed append."""

    async def save_snapshots(self, *args, **kwargs) -> None:
        raise asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress")


async def test_a_snapshot_cut_off_after_the_commit_does_not_fail_the_command(pool, clock, caplog):
    ledger = Ledger(SnapshotCutOff(pool), code_key=b"k" * 32, clock=clock, snapshot_interval_events=2)
    card_id = str((await issue(ledger)).card.id)
    # Version 2 makes a snapshot due; the Credit is committed before it, so it must be answered.
    await ledger.create_transaction(card_id, operation="Credit", value=Decimal(10), description="", request_id="c")
    await ledger.snapshots_saved()
    assert (await ledger.card(card_id)).balance == 1000
    assert await pool.fetchval("select count(*) from snapshots") == 0
    assert "1 snapshots not saved" in caplog.text
