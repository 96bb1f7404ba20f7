"""Reading a streaming replica: where it is (``GIFTCARD_REPLICA_URL``) and how far behind it is.

What only reads (exports, ``audit verify``, the auditor's pages, the read-model listings) may be
served by a hot standby, so that it never competes with the writes. Such an answer states the
standby's lag, measured before it reads: its rows are at least that fresh. With no replica
configured every read goes to the primary, as before.

A replica is never upgraded (it is read-only: its schema is the primary's, replicated), and a
snapshot exported there can be imported by another session on the same standby (PostgreSQL 10 and
later; checked on 15 by tests/test_read_replicas.py), so ``audit verify`` splits its walk there too.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import msgspec

from ledger.database import create_pool, with_database

T = TypeVar("T")

REPLICA_URL_ENV = "GIFTCARD_REPLICA_URL"

# Replay delay: how long ago the last transaction replayed committed on the primary. Once the
# standby has replayed everything it received, that timestamp only ages while the primary is idle,
# so the delay is 0 then. Bytes: WAL received but not yet replayed (what was not received yet is
# unknown to the standby). clock_timestamp(), not now(): the caller may be inside a transaction.
_LAG = """
select pg_is_in_recovery() as in_recovery,
       pg_last_wal_receive_lsn() is not null
           and pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() as replayed_all,
       extract(epoch from clock_timestamp() - pg_last_xact_replay_timestamp())::float8 as replay_delay_s,
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint as bytes_behind
"""


class ReplicaLag(msgspec.Struct, frozen=True):
    """How far a replica is behind its primary; ``seconds`` None: not measurable yet (nothing
    replayed since the standby started); ``bytes_behind`` None: the standby receives no stream."""

    in_recovery: bool
    seconds: float | None
    bytes_behind: int | None

    def seconds_text(self) -> str:
        return "unknown" if self.seconds is None else f"{self.seconds:.3f}"


def configured_replica_url() -> str | None:
    return os.environ.get(REPLICA_URL_ENV) or None


async def replica_lag(connection: asyncpg.Connection | asyncpg.Pool) -> ReplicaLag:
    row = await connection.fetchrow(_LAG)
    if not row["in_recovery"]:  # a server that is not a standby (or was promoted) has nothing to replay
        return ReplicaLag(in_recovery=False, seconds=0.0, bytes_behind=0)
    if row["replayed_all"]:
        seconds: float | None = 0.0
    elif row["replay_delay_s"] is None:
        seconds = None
    else:
        seconds = max(0.0, row["replay_delay_s"])
    return ReplicaLag(in_recovery=True, seconds=seconds, bytes_behind=row["bytes_behind"])


def lag_line(lag: ReplicaLag) -> str:
    """What a command that read the replica says about it, on stderr."""
    if not lag.in_recovery:
        return f"reading the replica ({REPLICA_URL_ENV}): it is not a standby (not in recovery), so nothing lags"
    behind = "" if lag.bytes_behind is None else f", {lag.bytes_behind} byte(s) of WAL received but not replayed"
    return f"reading the replica ({REPLICA_URL_ENV}): replica lag {lag.seconds_text()} s{behind}"


def with_read_database(
    work: Callable[[asyncpg.Pool], Awaitable[T]],
    *,
    pool_size_max: int = 4,
    report_lag: Callable[[str], None] | None = None,
) -> T:
    """Runs ``work`` on the replica when ``GIFTCARD_REPLICA_URL`` is set (its lag reported first, on
    stderr by default), else exactly as ``with_database`` does on the primary."""
    url = configured_replica_url()
    if url is None:
        return with_database(work, pool_size_max=pool_size_max)
    report = report_lag or (lambda line: print(line, file=sys.stderr, flush=True))

    async def run() -> T:
        pool = await create_pool(url, size_min=1, size_max=pool_size_max)
        try:
            # Measured before the work reads, so what it reads is at least that fresh.
            report(lag_line(await replica_lag(pool)))
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(run())
