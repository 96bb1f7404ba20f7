"""Losing the PostgreSQL primary, with a real failover manager: Patroni and etcd (tests/patroni_cluster.py).

1. The cluster comes up with a leader and a synchronous standby.
2. The leader's machine is SIGKILLed while a client writes through the multi-host URL: the standby
   is promoted within the target, every acknowledged row is on it, the writes resume.
3. The lost node, started again, rejoins as a standby of the new leader (pg_rewind) and refuses
   writes: it never takes one.
4. The same with the hub under 16 concurrent Debit connections: no 500, no hang, every Debit
   acknowledged once, nothing acknowledged lost, and the same hub process carries on.

Measured times are printed (run with -s or -rP to see them).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.debit_load import RetryPolicy, send_all, until_acknowledged
from tests.hub_process import HubProcess, TimedClient
from tests.patroni_cluster import LOOP_WAIT_S, RETRY_TIMEOUT_S, TTL_S, PatroniCluster, PatroniNode, patroni_missing
from tests.test_faults import (
    LOAD_CREDIT,
    assert_every_debit_came_through,
    assert_ledger_consistent_at,
    credits_of,
    debit_again_without_restart,
    funded_load,
    summary,
)

pytestmark = pytest.mark.skipif(patroni_missing() is not None, reason=patroni_missing() or "")

FAILOVER_TARGET_S = 15.0  # kill to the first acknowledged write on the new leader
TEST_TIMEOUT_S = 240  # cluster start, failover and rejoin on a shared 2-core machine; a hang fails
CONNECT_TIMEOUT_S = 2.0
STATEMENT_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 0.05
ROWS_BEFORE_KILL = 50
ROWS_AFTER_RESUME = 50
DATABASE = "giftcard"
# What a client sees while there is no writable node: refused connections, cut connections, a
# standby that does not match target_session_attrs, timeouts.
CONNECTION_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def cluster() -> AsyncIterator[PatroniCluster]:
    """A fresh cluster per test (a failover changes it for good); stopped even if start fails."""
    cluster = PatroniCluster()
    try:
        await asyncio.to_thread(cluster.start)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


# ---- a plain client that writes one row at a time --------------------------------------------


@dataclass
class Writes:
    """What a client was told about each row: acknowledged (and when), or left without an answer."""

    acknowledged: dict[int, float] = field(default_factory=dict)  # row -> monotonic time of the ack
    served_by: dict[int, int] = field(default_factory=dict)  # row -> port of the server that committed it
    unanswered: set[int] = field(default_factory=set)  # the commit was sent, no answer came back
    errors: dict[str, int] = field(default_factory=dict)

    def acknowledged_by(self, node: PatroniNode) -> list[float]:
        """When the rows committed by ``node`` were acknowledged, in order."""
        return sorted(at for row, at in self.acknowledged.items() if self.served_by[row] == node.port)

    def note(self, error: BaseException) -> None:
        name = type(error).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


async def write_rows(url: str, writes: Writes, stop: asyncio.Event) -> None:
    """INSERTs numbered rows one by one through ``url`` until ``stop``, reconnecting on any error.
    Each statement is bounded, so a hang shows up as an unanswered row, not a stuck test."""
    row = 0
    while not stop.is_set():
        try:
            connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
        except CONNECTION_ERRORS as e:
            writes.note(e)
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        try:
            while not stop.is_set():
                row += 1
                try:
                    port = await connection.fetchval(
                        "insert into writes (n) values ($1) returning inet_server_port()",
                        row,
                        timeout=STATEMENT_TIMEOUT_S,
                    )
                except CONNECTION_ERRORS:
                    writes.unanswered.add(row)
                    raise
                writes.acknowledged[row] = time.monotonic()
                writes.served_by[row] = port
        except CONNECTION_ERRORS as e:
            writes.note(e)
        finally:
            connection.terminate()  # never waits on a dead server


async def until(what: str, probe, timeout_s: float, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s} s")
        await asyncio.sleep(poll_s)


async def create_writes_table(cluster: PatroniCluster) -> None:
    connection = await asyncpg.connect(cluster.url(), timeout=CONNECT_TIMEOUT_S)
    try:
        await connection.execute("create table writes (n int primary key)")
    finally:
        await connection.close()


async def rows_on(node: PatroniNode) -> set[int]:
    connection = await asyncpg.connect(node.url(), timeout=CONNECT_TIMEOUT_S)
    try:
        return {row["n"] for row in await connection.fetch("select n from writes")}
    finally:
        await connection.close()


@dataclass
class Failover:
    old: PatroniNode
    new: PatroniNode
    killed_at: float
    leader_after_s: float  # kill to the REST API naming the new leader
    write_after_s: float  # kill to the first acknowledged write


async def kill_leader_under_writes(cluster: PatroniCluster, writes: Writes) -> Failover:
    """Lets the client write, kills the leader's machine, waits for a new leader and resumed writes."""
    await until(f"{ROWS_BEFORE_KILL} rows before the kill", lambda: len(writes.acknowledged) >= ROWS_BEFORE_KILL, 30)
    old, killed_at = await asyncio.to_thread(cluster.kill_leader)
    new = await asyncio.to_thread(cluster.wait_for_leader, old, FAILOVER_TARGET_S * 3)
    leader_after_s = time.monotonic() - killed_at
    # The first acknowledged write after the kill is the first one the new leader commits (an
    # answer from the old leader may still be read just after the SIGKILL).
    await until("a write on the new leader", lambda: writes.acknowledged_by(new), FAILOVER_TARGET_S * 3)
    write_after_s = writes.acknowledged_by(new)[0] - killed_at
    await until(
        f"{ROWS_AFTER_RESUME} rows after the failover",
        lambda: len(writes.acknowledged_by(new)) >= ROWS_AFTER_RESUME,
        30,
    )
    print(
        f"ttl={TTL_S} loop_wait={LOOP_WAIT_S} retry_timeout={RETRY_TIMEOUT_S}: {old.name} killed; "
        f"{new.name} leader after {leader_after_s:.2f} s, first write acknowledged after {write_after_s:.2f} s; "
        f"client errors {writes.errors}"
    )
    return Failover(old, new, killed_at, leader_after_s, write_after_s)


async def run_failover_with_writes(cluster: PatroniCluster) -> tuple[Failover, Writes]:
    await create_writes_table(cluster)
    writes, stop = Writes(), asyncio.Event()
    writer = asyncio.create_task(write_rows(cluster.url(), writes, stop))
    try:
        failover = await kill_leader_under_writes(cluster, writes)
    finally:
        stop.set()
        await writer
    return failover, writes


# ---- 1. the cluster ----------------------------------------------------------------------------


async def test_cluster_has_a_leader_and_a_streaming_synchronous_standby(cluster):
    async with asyncio.timeout(TEST_TIMEOUT_S):
        leader, replica = cluster.leader(), cluster.replica()
        assert leader is not replica
        connection = await asyncpg.connect(leader.url(), timeout=CONNECT_TIMEOUT_S)
        try:
            assert await connection.fetchval("select pg_is_in_recovery()") is False
            states = await connection.fetch("select application_name, state, sync_state from pg_stat_replication")
        finally:
            await connection.close()
        assert [tuple(row) for row in states] == [(replica.name, "streaming", "sync")]
        connection = await asyncpg.connect(cluster.url(), timeout=CONNECT_TIMEOUT_S)
        try:  # the multi-host URL lands on the leader, whichever node is listed first
            assert await connection.fetchval("select inet_server_port()") == leader.port
        finally:
            await connection.close()


# ---- 2. the leader's machine is lost under writes ----------------------------------------------


async def test_sigkill_of_the_leader_promotes_the_standby_and_loses_no_acknowledged_write(cluster):
    async with asyncio.timeout(TEST_TIMEOUT_S):
        failover, writes = await run_failover_with_writes(cluster)

        assert failover.new is not failover.old
        assert failover.write_after_s < FAILOVER_TARGET_S, failover
        on_new_leader = await rows_on(failover.new)
        lost = set(writes.acknowledged) - on_new_leader
        assert not lost, f"acknowledged but not on the new leader: {sorted(lost)[:20]}"
        unexplained = on_new_leader - set(writes.acknowledged) - writes.unanswered
        assert not unexplained, f"rows nobody wrote: {sorted(unexplained)[:20]}"
        assert len(writes.unanswered) <= 2, writes.unanswered  # one in flight per connection lost


# ---- 3. the lost node comes back as a standby ----------------------------------------------------


async def wal_receiver_of(node: PatroniNode) -> asyncpg.Record | None:
    connection = await asyncpg.connect(node.url(), timeout=CONNECT_TIMEOUT_S)
    try:
        return await connection.fetchrow(
            "select pg_is_in_recovery() as in_recovery, status, received_tli, sender_port from pg_stat_wal_receiver"
        )
    finally:
        await connection.close()


async def timeline_of(leader: PatroniNode) -> int:
    connection = await asyncpg.connect(leader.url(), timeout=CONNECT_TIMEOUT_S)
    try:
        return int((await connection.fetchval("select pg_walfile_name(pg_current_wal_lsn())"))[:8], 16)
    finally:
        await connection.close()


async def caught_up(replica: PatroniNode, leader: PatroniNode) -> None:
    """Waits until the replica has replayed everything the leader has written so far."""
    leader_connection = await asyncpg.connect(leader.url(), timeout=CONNECT_TIMEOUT_S)
    replica_connection = await asyncpg.connect(replica.url(), timeout=CONNECT_TIMEOUT_S)
    try:
        target = await leader_connection.fetchval("select pg_current_wal_lsn()")
        while await replica_connection.fetchval("select pg_last_wal_replay_lsn() < $1::pg_lsn", target):
            await asyncio.sleep(0.05)
    finally:
        await leader_connection.close()
        await replica_connection.close()


async def test_the_old_leader_rejoins_as_a_standby_and_never_takes_a_write(cluster):
    async with asyncio.timeout(TEST_TIMEOUT_S):
        failover, writes = await run_failover_with_writes(cluster)
        started = time.monotonic()
        await asyncio.to_thread(cluster.restart_node, failover.old)
        print(f"{failover.old.name} rejoined after {time.monotonic() - started:.2f} s")

        assert cluster.leader() is failover.new  # coming back does not take the leadership back
        new_timeline = await timeline_of(failover.new)
        assert new_timeline > 1

        async def streaming() -> asyncpg.Record | None:
            try:
                receiver = await wal_receiver_of(failover.old)
            except (OSError, asyncpg.CannotConnectNowError):
                return None  # Patroni may still be restarting it as a standby (after a rewind, say)
            return receiver if receiver and receiver["status"] == "streaming" else None

        receiver = None
        while receiver is None:  # bounded by the timeout above
            receiver = await streaming()
            await asyncio.sleep(0.1)
        assert receiver["in_recovery"] is True
        assert receiver["received_tli"] == new_timeline
        assert receiver["sender_port"] == failover.new.port

        connection = await asyncpg.connect(failover.old.url(), timeout=CONNECT_TIMEOUT_S)
        try:
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await connection.execute("insert into writes (n) values (-1)")
        finally:
            await connection.close()
        # Its rows are the new leader's, nothing of its own: whatever it had beyond was rewound.
        await caught_up(failover.old, failover.new)
        assert await rows_on(failover.old) == await rows_on(failover.new)
        assert set(writes.acknowledged) <= await rows_on(failover.old)
        rewound = "rewind" in failover.old.patroni_log.read_text(errors="replace")
        print(f"pg_rewind mentioned in {failover.old.name}'s Patroni log: {rewound}")


# ---- 4. the hub under load ---------------------------------------------------------------------


HUB_LOAD_S = 150  # the deadline of every client's retries
HUB_CONCURRENCY = 16
HUB_DEBITS = 600
HUB_KILL_AT = 200


async def test_the_hub_carries_on_through_a_failover_under_load(cluster, tmp_path: Path):
    async with asyncio.timeout(TEST_TIMEOUT_S):
        admin = await asyncpg.connect(cluster.url(), timeout=CONNECT_TIMEOUT_S)
        try:
            await admin.execute(f"create database {DATABASE}")
        finally:
            await admin.close()
        url = cluster.url(DATABASE)
        hub = HubProcess(url, tmp_path / "hub.log")
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                await hub.start()
                client = TimedClient(http, hub.base_url)
                cards, debits = await funded_load(client, 20, HUB_DEBITS)  # 30 Debits a card: none runs out of funds
                deadline = asyncio.get_running_loop().time() + HUB_LOAD_S
                killed: list[float] = []  # when the kill began, when every process was gone

                async def kill_after_acknowledged() -> None:
                    await until_acknowledged(debits, HUB_KILL_AT, deadline)
                    _, killed_at = await asyncio.to_thread(cluster.kill_leader)
                    killed.extend([killed_at, time.monotonic()])

                async with asyncio.TaskGroup() as group:
                    group.create_task(
                        send_all([client], debits, concurrency=HUB_CONCURRENCY, policy=RetryPolicy(), deadline=deadline)
                    )
                    group.create_task(kill_after_acknowledged())

                first_success = client.first_success_sent_after(killed[1])
                recovery_s = None if first_success is None else first_success - killed[0]
                print(
                    f"hub: {summary(debits)}; codes {Counter(d.code for d in debits if d.code)}; kill to first 2xx "
                    f"{'never' if recovery_s is None else f'{recovery_s:.2f} s'}"
                )
                assert_every_debit_came_through(debits)
                assert recovery_s is not None and recovery_s < FAILOVER_TARGET_S, recovery_s
                after = await debit_again_without_restart(client, hub, cards[0])
                await assert_ledger_consistent_at(url, client, [*debits, after], credits_of(cards, LOAD_CREDIT))
        finally:
            await hub.stop()
