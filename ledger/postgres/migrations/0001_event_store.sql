-- The event store: one append-only table holding every fact the ledger knows.
--
-- position   global insertion order (an identity; gaps and out-of-order commits happen)
-- tx         the writing transaction's id; readers of the global order follow (tx, position)
--            and stop below the oldest transaction still running, so a late commit is never skipped
-- stream_id  the aggregate (a gift card's id, or another stream such as the provider registry)
-- version    1, 2, 3... inside a stream; unique (stream_id, version) is the optimistic lock
-- data       the event's own fields, as JSON an auditor can query with plain SQL
-- metadata   who and what caused it: request id, actor, correlation id
-- hash       sha256(previous event's hash || canonical bytes of this event): a chain per stream
-- idempotency_key  the client's requestId, unique per stream: a second wall behind the domain's check

create table events (
    position        bigint generated always as identity primary key,
    tx              xid8        not null default pg_current_xact_id(),
    stream_id       text        not null,
    version         integer     not null check (version > 0),
    type            text        not null,
    data            jsonb       not null,
    metadata        jsonb       not null default '{}',
    recorded_at     timestamptz not null default clock_timestamp(),
    hash            bytea       not null,
    idempotency_key text,
    unique (stream_id, version)
);

create index events_commit_order on events (tx, position);
create unique index events_idempotency on events (stream_id, idempotency_key) where idempotency_key is not null;

-- Immutability is the database's job, not the application's good manners.
create function events_refuse_change() returns trigger language plpgsql as $$
begin
    raise exception 'events are immutable: % on events refused', tg_op
        using errcode = 'insufficient_privilege';
end
$$;

create trigger events_no_update_or_delete before update or delete on events
    for each row execute function events_refuse_change();
create trigger events_no_truncate before truncate on events
    for each statement execute function events_refuse_change();

-- Snapshots are a disposable cache of a stream's state at one version.
create table snapshots (
    stream_id  text primary key,
    version    integer     not null,
    hash       bytea       not null,
    state      jsonb       not null,
    taken_at   timestamptz not null default clock_timestamp()
);
