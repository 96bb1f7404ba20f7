"""Streaming replication, seen from both ends.

From the primary: whether what it acknowledges is also on a standby, and how far each standby is
behind. A commit is safe from the loss of the primary's machine only when PostgreSQL waits, before
it answers, for a synchronous standby to have flushed it: ``synchronous_commit`` ``on`` (or
``remote_apply``) and a standby whose ``sync_state`` is ``sync`` or ``quorum``. Anything less and
an acknowledged Debit can vanish in a failover. ``/readyz``, ``giftcard db status`` and a warning
at start say which it is.

From a replica (``GIFTCARD_REPLICA_URL``): what only reads (exports, ``audit verify``, the
auditor's pages, the read-model listings) may be served by a hot standby, so that it never
competes with the writes. Such an answer states the standby's lag, measured before it reads: its
rows are at least that fresh. A replica is never upgraded (it is read-only: its schema is the
primary's, replicated), and a snapshot exported there can be imported by another session on the
same standby (PostgreSQL 10 and later; checked on 15 by tests/test_read_replicas.py), so
``audit verify`` splits its walk there too. With no replica configured every read goes to the
primary.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import msgspec

from ledger.postgres.database import Database, with_database

T = TypeVar("T")

# Settings of synchronous_commit under which a COMMIT's answer waits for a standby's flush (or apply).
DURABLE_COMMIT_SETTINGS = ("on", "remote_apply")
SYNCHRONOUS_STATES = ("sync", "quorum")

_SERVER = """
select current_setting('synchronous_commit') as synchronous_commit,
       current_setting('synchronous_standby_names') as synchronous_standby_names,
       pg_is_in_recovery() as in_recovery
"""

# Lag in bytes of WAL the standby has not replayed yet, and in time as the primary measured it.
# Without pg_monitor (or pg_read_all_stats) a role sees the rows but not their columns: None.
_STANDBYS = """
select application_name as name, state, sync_state,
       case when pg_is_in_recovery() then null
            else pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint end as lag_bytes,
       extract(epoch from replay_lag)::float8 as replay_lag_s
from pg_stat_replication
order by application_name
"""


class Standby(msgspec.Struct, kw_only=True, frozen=True):
    name: str | None
    state: str | None  # streaming, catchup, startup...; None when this role may not see it
    sync_state: str | None  # sync, quorum, potential or async
    lag_bytes: int | None
    replay_lag_s: float | None

    @property
    def synchronous(self) -> bool:
        return self.state == "streaming" and self.sync_state in SYNCHRONOUS_STATES


class Replication(msgspec.Struct, kw_only=True, frozen=True):
    synchronous_commit: str
    synchronous_standby_names: str
    in_recovery: bool
    standbys: tuple[Standby, ...]

    @property
    def synchronous(self) -> bool:
        """Every acknowledged commit is on a standby too."""
        return self.synchronous_commit in DURABLE_COMMIT_SETTINGS and any(s.synchronous for s in self.standbys)

    @property
    def stats_hidden(self) -> bool:
        """The role may not read pg_stat_replication's columns (it needs pg_monitor)."""
        return any(s.sync_state is None for s in self.standbys)

    def why_not_synchronous(self) -> str | None:
        """What an operator must fix for commits to survive the primary's loss; None when nothing."""
        if self.synchronous:
            return None
        if self.in_recovery:
            return "this server is a standby"
        if self.synchronous_commit not in DURABLE_COMMIT_SETTINGS:
            return f"synchronous_commit is {self.synchronous_commit!r}, not 'on'"
        if not self.synchronous_standby_names.strip():
            return "synchronous_standby_names is empty: commits wait for no standby"
        if self.stats_hidden:
            return "this role cannot see the standbys' state (grant it pg_monitor)"
        # Commits now wait for a standby that is not there: writes time out (503) until one is back.
        return "no synchronous standby is streaming: every commit waits for one"

    def to_wire(self) -> dict[str, object]:
        return {
            "synchronous": self.synchronous,
            "reason": self.why_not_synchronous(),
            "synchronousCommit": self.synchronous_commit,
            "synchronousStandbyNames": self.synchronous_standby_names,
            "standbys": [
                {
                    "name": s.name,
                    "state": s.state,
                    "syncState": s.sync_state,
                    "lagBytes": s.lag_bytes,
                    "replayLagSeconds": s.replay_lag_s,
                }
                for s in self.standbys
            ],
        }


async def replication_status(connection: asyncpg.Connection | asyncpg.Pool) -> Replication:
    server = await connection.fetchrow(_SERVER)
    rows = await connection.fetch(_STANDBYS)
    return Replication(
        synchronous_commit=server["synchronous_commit"],
        synchronous_standby_names=server["synchronous_standby_names"],
        in_recovery=server["in_recovery"],
        standbys=tuple(Standby(**dict(row)) for row in rows),
    )


# ---- a replica, and its lag behind the primary ---------------------------------------------------

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
    primary: Database,
    replica_url: str | None,
    *,
    pool_size_max: int = 4,
    report_lag: Callable[[str], None] | None = None,
) -> T:
    """Runs ``work`` on the replica at ``replica_url`` when there is one (its lag reported first, on
    stderr by default), else exactly as ``with_database`` does on the primary."""
    if replica_url is None:
        return with_database(work, primary, pool_size_max=pool_size_max)
    report = report_lag or (lambda line: print(line, file=sys.stderr, flush=True))

    async def lag_then_work(pool: asyncpg.Pool) -> T:
        # Measured before the work reads, so what it reads is at least that fresh.
        report(lag_line(await replica_lag(pool)))
        return await work(pool)

    replica = Database(url=replica_url)
    return with_database(lag_then_work, replica, pool_size_max=pool_size_max, upgrade_schema=False)
