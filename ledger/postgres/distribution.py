"""Sharding on Citus: which tables are split by card, which are copied to every node.

Every rule of the ledger lives inside one card's stream, so the event table is distributed by
``stream_id`` and the other per-card tables are co-located with it: every card command then reads
and writes one shard, on one worker, in one local transaction. Small tables every node may need
are reference tables (a copy on each node). The same migrations create the same tables on plain
PostgreSQL; only here, on a Citus coordinator, are they distributed, once, by ``giftcard db
upgrade`` (``ledger.postgres.migrate.upgrade`` calls ``distribute``).

Two changes the distribution needs and plain PostgreSQL does not:
- a distributed table's primary key must hold the distribution column: ``events`` is keyed by
  ``(stream_id, position)`` instead of ``position`` alone (``unique (stream_id, version)`` stays);
- the immutability triggers are row triggers on a distributed table, which Citus creates on every
  shard placement only with ``citus.enable_unsafe_triggers`` (ours touch no other table: safe), so
  an UPDATE, DELETE or TRUNCATE run directly on a worker's shard is refused as well.

Row-level security (migrations 0016, 0019) holds on the workers too: Citus creates the tables'
policy and their ENABLE on every shard, and the service takes its scope there (ledger.postgres.tenancy:
SET LOCAL, which Citus sends on to the workers; the functions below, which run on a worker by
themselves, take it as their last argument, p_scope). Not FORCE, as on one server: see _OWNER_NOT_HELD.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import asyncpg

# Distributed by the card's id, co-located with events: (table, distribution column).
CARD_TABLES = (("events", "stream_id"), ("snapshots", "stream_id"))
# Copied to every node: small, read everywhere, and their uniqueness holds across every card
# (a redemption code's hash, a relationName).
REFERENCE_TABLES = ("card_lookup",)

# An online shard move replicates the rows written meanwhile as a role Citus makes a member of the
# tables' owner, and PostgreSQL's logical replication refuses to apply to a table whose row-level
# security holds for that role: with FORCE the move waited until its timeout. So on the cluster the
# owner is not held to the policy (a superuser never is anyway); the service's role, which is not
# the owner (giftcard db grant), is.
_OWNER_NOT_HELD = "alter table {table} no force row level security"
# Citus refuses a subquery in the policy of a distributed or reference table, so these keep the policy
# as migration 0016 wrote it, which reads the scope for every row, where 0023 reads it once per statement.
_POLICY_WITHOUT_SUBQUERIES = """
alter policy tenant_rows on {table}
    using (tenant_id = any(string_to_array(current_setting('giftcard.tenant', true), ','))
           or current_setting('giftcard.tenant', true) = '*')
"""

# How PostgreSQL names the constraint in a unique violation's message (lc_messages in English).
_CONSTRAINT_IN_MESSAGE = re.compile(r'unique constraint "([^"]+)"')
_CITUS_INSTALLED = "select exists (select 1 from pg_extension where extname = 'citus')"
# partmethod: 'h' hash-distributed, 'n' a reference table.
_DISTRIBUTION_METHOD = "select partmethod::text from pg_dist_partition where logicalrelid = $1::regclass"

# The first lines of every function below: p_scope for the rest of the transaction, as a SET LOCAL,
# which Citus sends on to the nodes the function's statements reach. Usually the call runs on the
# worker of its shard, and they reach only that shard there; but the coordinator runs the call itself
# inside a transaction block or while the shard's placement changes, and a worker whose shard has
# just moved away reaches the shard's new worker: set_config alone would hold on the first node only.
# Citus sends on a SET LOCAL run in a transaction block, a DO block or a function called from
# another; in a function called by a client's statement, as these are, it does not: hence the DO.
# A SET makes the functions volatile (PostgreSQL refuses one in a stable function).
_SCOPE_FOR_THE_TRANSACTION = """\
    perform set_config('citus.propagate_set_commands', 'local', true);
    execute format('do %L', format('begin set local giftcard.tenant = %L; end', coalesce(p_scope, '')));
"""

# Group commit on the cluster: one event for each of many streams that all live on the shard of
# p_route, in one call delegated to that shard's worker, so the whole group is one local
# transaction and one commit there. Each row is judged on its own, as ledger.eventstore.store's _APPEND_EACH
# does on one server: a row whose guard fails is skipped, and so is a row that hits a unique key (a
# lost race, a reused idempotency key), through ON CONFLICT DO NOTHING (no subtransaction per row,
# as an exception block would open). Returns the streams appended. Row by row, in plain statements
# rather than one INSERT ... SELECT: Citus plans each as a local query on the shard, where an
# INSERT ... SELECT would go through its distributed INSERT ... SELECT machinery. The caller sends
# the rows in stream order, so two writers never wait for each other in a cycle.
# The JSON comes as text[] (see _APPEND_ON_ONE_SHARD in ledger.eventstore.store: why arrays go as text).
# p_scope is the tenant scope (ledger.postgres.tenancy) the rows are written in.
_APPEND_EVENTS_FUNCTION = """
create or replace function append_events(
    p_route text, p_stream_ids text[], p_expected integer[], p_types text[], p_data text[], p_metadata text[],
    p_hashes bytea[], p_idempotency_keys text[], p_previous_hashes bytea[], p_scope text
) returns text[] language plpgsql as $$
declare
    r record;
    inserted text;
    appended text[] := '{}';
begin
{scope_for_the_transaction}    for r in
        select * from unnest(p_stream_ids, p_expected, p_types, p_data, p_metadata, p_hashes, p_idempotency_keys,
                             p_previous_hashes)
            as u(stream_id, expected, type, data, metadata, hash, idempotency_key, previous_hash)
    loop
        -- The guard, as ledger.eventstore.store's _GUARDS_HELD checks it for many streams at once from the
        -- coordinator: here one stream at a time, each a lookup on this shard.
        continue when r.expected > 0 and not exists (
            select 1 from events where stream_id = r.stream_id and version = r.expected and hash = r.previous_hash
        );
        inserted := null;
        insert into events (stream_id, version, type, data, metadata, hash, idempotency_key)
        values (r.stream_id, r.expected + 1, r.type, r.data::jsonb, r.metadata::jsonb, r.hash, r.idempotency_key)
        on conflict do nothing
        returning stream_id into inserted;
        if inserted is not null then
            appended := appended || inserted;
        end if;
    end loop;
    return appended;
end
$$
""".replace("{scope_for_the_transaction}", _SCOPE_FOR_THE_TRANSACTION)
_APPEND_EVENTS_SIGNATURE = (
    "append_events(text, text[], integer[], text[], text[], text[], bytea[], text[], bytea[], text)"
)

# Readers of the commit order on the cluster (ledger.eventstore.commit_order): a source is a shard, and its
# events are read on the shard's worker, from the shard's own table (events_<shard id>), where a
# read of events by source from the coordinator is sent to every shard. The call goes to the shard
# that p_route's hash falls in, a key picked for the purpose (ledger.eventstore.store's CitusBackend._routes_to). Where the
# call is not delegated (inside a transaction block), no shard is local: the distributed table is
# read, by source, as before. Call them only as "select ... from source_events(...)" or
# "select source_head(...)": Citus 13.2 delegates only those shapes, and the coordinator crashed on
# the function in a subquery ("select count(*) from (select ... from source_events(...)) x").
# p_scope is the tenant scope of the read, as in append_events. Bitmap and sequential scans are off
# in both, for the reason migration 0022 gives: a source's range is read by its index, in its order.
_SOURCE_EVENTS_FUNCTION = """
create or replace function source_events(p_route text, p_source bigint, p_after bigint, p_limit integer, p_scope text)
returns setof events language plpgsql
set enable_bitmapscan = off set enable_seqscan = off as $$
declare
    shard regclass := to_regclass('events_' || p_source);
begin
{scope_for_the_transaction}    if shard is null then
        return query select * from events where source = p_source and seq > p_after order by seq limit p_limit;
    else
        return query execute format('select * from %s where source = $1 and seq > $2 order by seq limit $3', shard)
            using p_source, p_after, p_limit;
    end if;
end
$$
""".replace("{scope_for_the_transaction}", _SCOPE_FOR_THE_TRANSACTION)
_SOURCE_EVENTS_SIGNATURE = "source_events(text, bigint, bigint, integer, text)"

_SOURCE_HEAD_FUNCTION = """
create or replace function source_head(p_route text, p_source bigint, p_scope text)
returns bigint language plpgsql
set enable_bitmapscan = off set enable_seqscan = off as $$
declare
    shard regclass := to_regclass('events_' || p_source);
    head bigint;
begin
{scope_for_the_transaction}    if shard is null then
        select seq into head from events where source = p_source order by seq desc limit 1;
    else
        execute format('select seq from %s where source = $1 order by seq desc limit 1', shard)
            into head using p_source;
    end if;
    return head;
end
$$
""".replace("{scope_for_the_transaction}", _SCOPE_FOR_THE_TRANSACTION)
_SOURCE_HEAD_SIGNATURE = "source_head(text, bigint, text)"


class DistributedFunction(NamedTuple):
    """A function run on the worker of the shard its ``argument`` names, co-located with events."""

    signature: str
    definition: str  # CREATE OR REPLACE: installed over any earlier body
    argument: str
    report: str  # what distribute() says when it installs this body

    @property
    def body(self) -> str:
        """The body between the dollar quotes: what PostgreSQL keeps as the function's source."""
        return self.definition.split("$$")[1]


FUNCTIONS = (
    DistributedFunction(
        _APPEND_EVENTS_SIGNATURE, _APPEND_EVENTS_FUNCTION, "p_route", "append_events runs on the shard's worker"
    ),
    DistributedFunction(
        _SOURCE_EVENTS_SIGNATURE, _SOURCE_EVENTS_FUNCTION, "p_route", "source_events reads on the shard's worker"
    ),
    DistributedFunction(
        _SOURCE_HEAD_SIGNATURE, _SOURCE_HEAD_FUNCTION, "p_route", "source_head reads on the shard's worker"
    ),
)
# Functions an earlier release installed that nothing calls any more: (signature, name).
RETIRED_FUNCTIONS = (
    ("append_event(text, integer, text, jsonb, jsonb, bytea, text, bytea)", "append_event"),
    # Before they took the tenant scope (p_scope) to the worker.
    ("append_events(text, text[], integer[], text[], text[], text[], bytea[], text[], bytea[])", "append_events"),
    ("source_events(text, bigint, bigint, integer)", "source_events"),
    ("source_head(text, bigint)", "source_head"),
)
# A function is current when its stored source is the one shipped and Citus runs it on the workers
# (distributed, with an argument to route by); null when it does not exist.
_FUNCTION_CURRENT = """
select p.prosrc = $2 and exists (
    select 1 from pg_dist_object d
    where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.distribution_argument_index is not null
)
from pg_proc p where p.oid = to_regprocedure($1)
"""
_EXISTS = "select to_regprocedure($1) is not null"

_KEY_FOR_SHARDING = """
alter table events drop constraint events_pkey, add primary key (stream_id, position)
"""


def violates(error: asyncpg.UniqueViolationError, constraint: str) -> bool:
    """Whether ``error`` is a violation of ``constraint``. On Citus the error comes from the shard
    that refused the row and the coordinator relays only its message, which names that shard's
    copy of the constraint: ``{constraint}_{shard id}``."""
    named = _CONSTRAINT_IN_MESSAGE.search(error.message or "")
    name = error.constraint_name or (named[1] if named else "")
    return name == constraint or (name.startswith(constraint + "_") and name[len(constraint) + 1 :].isdigit())


async def on_citus_coordinator(connection: asyncpg.Connection) -> bool:
    return await connection.fetchval(_CITUS_INSTALLED) and await connection.fetchval("select citus_is_coordinator()")


async def is_distributed(connection: asyncpg.Connection | asyncpg.Pool, table: str = "events") -> bool:
    """Whether ``table`` is split into shards by Citus (False on plain PostgreSQL)."""
    return await connection.fetchval(_CITUS_INSTALLED) and await _method(connection, table) == "h"


async def _method(connection: asyncpg.Connection | asyncpg.Pool, table: str) -> str | None:
    return await connection.fetchval(_DISTRIBUTION_METHOD, table)


async def distribution_pending(connection: asyncpg.Connection) -> bool:
    """A Citus coordinator with a table not distributed yet, or a function not as shipped: a role
    that may not change the schema finds nothing to do on a distributed ledger, as on a current one."""
    if not await on_citus_coordinator(connection):
        return False
    tables = [table for table, _ in CARD_TABLES] + list(REFERENCE_TABLES)
    undistributed = [table for table in tables if await _method(connection, table) is None]
    return bool(undistributed) or bool(await _functions_outdated(connection)) or bool(await _retired(connection))


async def _functions_outdated(connection: asyncpg.Connection) -> list[DistributedFunction]:
    """Functions missing, not distributed, or whose body is not the one shipped (edited since)."""
    return [f for f in FUNCTIONS if not await connection.fetchval(_FUNCTION_CURRENT, f.signature, f.body)]


async def _retired(connection: asyncpg.Connection) -> list[tuple[str, str]]:
    return [f for f in RETIRED_FUNCTIONS if await connection.fetchval(_EXISTS, f[0])]


async def distribute(connection: asyncpg.Connection) -> list[str]:
    """Distributes what is not distributed yet; returns what it did (empty on plain PostgreSQL,
    on a worker, or when everything already is). Runs in the caller's transaction."""
    if not await distribution_pending(connection):
        return []
    done = []
    await connection.execute("set local citus.enable_unsafe_triggers = on")
    for table, column in CARD_TABLES:
        if await _method(connection, table) is None:
            if table == "events":
                await connection.execute(_KEY_FOR_SHARDING)
            colocate = "none" if table == "events" else "events"
            await connection.execute(_POLICY_WITHOUT_SUBQUERIES.format(table=table))
            await connection.execute(
                "select create_distributed_table($1, $2, colocate_with => $3)", table, column, colocate
            )
            await connection.execute(_OWNER_NOT_HELD.format(table=table))
            done.append(f"{table} distributed by {column}")
    for table in REFERENCE_TABLES:
        if await _method(connection, table) is None:
            await connection.execute(_POLICY_WITHOUT_SUBQUERIES.format(table=table))
            await connection.execute("select create_reference_table($1)", table)
            await connection.execute(_OWNER_NOT_HELD.format(table=table))
            done.append(f"{table} copied to every node")
    outdated = await _functions_outdated(connection)
    # Every body, every time, over whatever an earlier release left: CREATE OR REPLACE on a
    # distributed function reaches its copy on every worker, which is the one a delegated call runs.
    for function in FUNCTIONS:
        await connection.execute(function.definition)
        await connection.execute(
            "select create_distributed_function($1, $2, colocate_with => 'events')",
            function.signature,
            function.argument,
        )
    done += [function.report for function in outdated]
    for signature, name in await _retired(connection):
        await connection.execute(f"drop function {signature}")
        done.append(f"{name} dropped")
    return done


async def grant_on_workers(connection: asyncpg.Connection, role: str) -> None:
    """Citus carries grants on distributed tables to their shards, not grants on sequences: the
    workers, where a card's events take their positions, get the one the service role needs here.
    ``role`` is checked by ``ledger.postgres.migrate.grant_service_role_statements`` first."""
    if await on_citus_coordinator(connection):
        await connection.execute(
            "select run_command_on_workers($1)", f"grant usage, select on sequence events_position_seq to {role}"
        )


async def add_worker(connection: asyncpg.Connection, host: str, port: int, *, coordinator_host: str | None) -> int:
    """Registers a worker with this coordinator (``giftcard db add-worker``); returns its node id.

    The worker must run PostgreSQL with Citus and the same database with the extension created.
    New shards go to it at once; existing ones move when an operator rebalances
    (``select citus_rebalance_start()``), online, while the service runs.
    """
    if not await on_citus_coordinator(connection):
        raise ValueError("this database is not a Citus coordinator (no citus extension, or a worker)")
    if coordinator_host is not None:
        await connection.execute("select citus_set_coordinator_host($1)", coordinator_host)
    return await connection.fetchval("select citus_add_node($1, $2)", host, port)
