"""Whether what the primary acknowledges is also on a standby, and how far each standby is behind.

A commit is safe from the loss of the primary's machine only when PostgreSQL waits, before it
answers, for a synchronous standby to have flushed it: ``synchronous_commit`` ``on`` (or
``remote_apply``) and a standby whose ``sync_state`` is ``sync`` or ``quorum``. Anything less and
an acknowledged Debit can vanish in a failover. ``/readyz``, ``giftcard db status`` and a warning
at start say which it is.
"""

from __future__ import annotations

import asyncpg
import msgspec

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
