"""The order in which events commit, kept per source, and readers' places in it (``Checkpoint``).

A source is where events are written under one lock: on one server one of a fixed number of
lanes, a stream's by its hash (``event_lane`` in SQL), so that appends to different lanes commit
side by side; on Citus each shard of ``events`` (the source is the shard's id). Every insert takes its
source's next ``seq`` in a trigger (migration 0013) that holds the source's lock until the
transaction ends, so within a source ``seq`` follows the commit order: a reader that sees ``seq``
n committed has seen every event below it too. (A row refused at insert, a lost race skipped by
``on conflict do nothing``, has taken its number by then: such numbers stay unused.) No reader waits for transactions it cannot
see (no ``pg_snapshot_xmin``), so a long transaction elsewhere, in another database or on
another node, holds nothing back; a slow writer holds back only its own source.

A card lives in one shard, so its events keep their order in one source; a shard moved to
another worker takes its rows and their ``seq`` with it, and its new node continues after them.
A reader's ``Checkpoint`` is the last ``seq`` it has taken from each source.

On Citus a source is read where it lives: ``EventStore.read_all`` calls ledger.postgres.distribution's
``source_events`` once per shard, side by side, and Citus runs each call on the shard's worker
against the shard's own table. A read of ``events`` by source from the coordinator (the statements
below, still used inside a transaction) is sent to every shard, since ``source`` is not the
distribution column.

A reader in one store's scope (a webhook subscription's batch) reads that store's events alone:
the statements below then name the tenant (``one_tenant``), so that each range is one of the index
``events_by_tenant (tenant_id, source, seq)`` (migration 0021). Row-level security would give the same
rows, but only by reading every store's events in the range and dropping the others': a quiet
store's reader, whose checkpoint moves only past its own events, would read the whole log written
since. Readers of every store (projections) keep the ranges of ``events_source_order``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import asyncpg
import msgspec

# Where events are written on Citus: the shards of events (a shard's id is its source).
_SHARD_SOURCES = """
select shardid from pg_dist_shard where logicalrelid = 'events'::regclass order by shardid
"""
_LANES = "select generate_series(0, event_lanes() - 1)"


_seqs_decoder = msgspec.json.Decoder(dict[int, int])  # {"source": seq}: msgspec reads the keys as integers


class Sequenced(Protocol):
    source: int
    seq: int


class Checkpoint(msgspec.Struct, frozen=True):
    """The last ``seq`` read from each source; a source it does not name has not been read at all."""

    seqs: tuple[tuple[int, int], ...] = ()  # (source, seq), sorted by source

    @classmethod
    def of(cls, seqs: Mapping[int, int]) -> Checkpoint:
        return cls(tuple(sorted((source, seq) for source, seq in seqs.items() if seq > 0)))

    @classmethod
    def from_json(cls, text: str | bytes) -> Checkpoint:
        return cls.of(_seqs_decoder.decode(text))

    def to_json(self) -> str:
        return msgspec.json.encode(self.render()).decode()

    def render(self) -> dict[str, int]:
        """As JSON shows it: {"source": seq}."""
        return {str(source): seq for source, seq in self.seqs}

    def as_dict(self) -> dict[int, int]:
        return dict(self.seqs)

    def seq(self, source: int) -> int:
        # A scan, not a dict: verify asks this for every event it walks, and a checkpoint names a few sources.
        for named, seq in self.seqs:
            if named == source:
                return seq
        return 0

    def covers(self, event: Sequenced) -> bool:
        """Whether a reader standing here has read ``event``."""
        return event.seq <= self.seq(event.source)

    def past(self, events: Iterable[Sequenced]) -> Checkpoint:
        """This checkpoint moved past ``events`` (each source's events in their order)."""
        seqs = self.as_dict()
        for event in events:
            seqs[event.source] = max(seqs.get(event.source, 0), event.seq)
        return Checkpoint.of(seqs)

    def joined(self, other: Checkpoint) -> Checkpoint:
        """As far as either has read, source by source."""
        seqs = self.as_dict()
        for source, seq in other.seqs:
            seqs[source] = max(seqs.get(source, 0), seq)
        return Checkpoint.of(seqs)

    def behind(self, head: Checkpoint) -> int:
        """How many events lie between here and ``head``: seq numbers, so counting the few that
        refused appends left unused, and 0 exactly when nothing is left to read."""
        return sum(max(0, seq - self.seq(source)) for source, seq in head.seqs)

    def behind_by_source(self, head: Checkpoint) -> dict[int, int]:
        return {source: max(0, seq - self.seq(source)) for source, seq in head.seqs}

    def __str__(self) -> str:
        return " ".join(f"{source}:{seq}" for source, seq in self.seqs) or "start"


START = Checkpoint()


def earliest(checkpoints: Iterable[Checkpoint]) -> Checkpoint:
    """The place every one of ``checkpoints`` has reached (each source's smallest seq)."""
    found = list(checkpoints)
    sources = {source for checkpoint in found for source, _ in checkpoint.seqs}
    return Checkpoint.of({source: min(c.seq(source) for c in found) for source in sources})


Connection = asyncpg.Connection | asyncpg.Pool


async def lanes(connection: Connection) -> Sequence[int]:
    """The sources events are written to on one server."""
    return [row[0] for row in await connection.fetch(_LANES)]


async def shards(connection: Connection) -> Sequence[int]:
    """The sources events are written to on Citus, now (a shard split makes more)."""
    return [row[0] for row in await connection.fetch(_SHARD_SOURCES)]


def read_after_statement(columns: str, source_count: int, *, one_tenant: bool = False) -> str:
    """The next events after a checkpoint, ``limit`` at most, ordered by (seq, source).

    One index range per source, each cut at the limit, then merged: the result holds a prefix of
    each source's events after its checkpoint, whatever the mix. Parameters: the limit, then each
    source and the seq read from it, then with ``one_tenant`` the tenant. A per-source subquery,
    not one join, because on Citus the source is not the distribution column: each range is its
    own query over the shards.
    """
    tenant = _tenant_is(2 * source_count + 2) if one_tenant else ""
    ranges = " union all ".join(
        f"(select {columns} from events where {tenant}source = ${2 * i + 2} and seq > ${2 * i + 3}"
        " order by seq limit $1)"
        for i in range(source_count)
    )
    return f"select * from ({ranges}) e order by seq, source limit $1"


def heads_statement(source_count: int, *, one_tenant: bool = False) -> str:
    """Each source's last seq (with ``one_tenant``, the tenant's last there): one index probe a source.
    Parameters: the sources, then with ``one_tenant`` the tenant."""
    tenant = _tenant_is(source_count + 1) if one_tenant else ""
    # The last row, not max(seq): under row-level security PostgreSQL turns max() into one index probe
    # only when its statistics say the policy lets rows through, else it aggregates the whole source.
    probes = " union all ".join(
        f"(select ${i + 1}::bigint as source, seq from events where {tenant}source = ${i + 1} order by seq desc limit 1)"
        for i in range(source_count)
    )
    return f"select source, seq from ({probes}) h"


def next_after_statement(source_count: int, *, one_tenant: bool = False) -> str:
    """When the oldest event after a checkpoint was recorded: the event at seq + 1 in each source;
    with ``one_tenant``, the tenant's first event past seq (seq + 1 is as likely another store's).
    Parameters: each source and the seq read from it, then with ``one_tenant`` the tenant."""
    tenant = _tenant_is(2 * source_count + 1) if one_tenant else ""

    def probe(i: int) -> str:
        source, seq = f"${2 * i + 1}", f"${2 * i + 2}"
        if one_tenant:
            return (
                f"(select recorded_at from events where {tenant}source = {source} and seq > {seq} order by seq limit 1)"
            )
        return f"(select recorded_at from events where source = {source} and seq = {seq} + 1)"

    probes = " union all ".join(probe(i) for i in range(source_count))
    return f"select min(recorded_at) from ({probes}) n"


def _tenant_is(parameter: int) -> str:
    return f"tenant_id = ${parameter} and "


def after_arguments(checkpoint: Checkpoint, among: Sequence[int]) -> list[int]:
    """(source, seq) for every source ``among`` and every source the checkpoint names, flattened."""
    named = checkpoint.as_dict()
    arguments: list[int] = []
    for source in sorted(set(among) | named.keys()):
        arguments += [source, named.get(source, 0)]
    return arguments
