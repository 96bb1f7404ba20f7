-- Operating many stores: each tenant's limits and state, and a log of what operators did to it.
--
-- max_rps and max_concurrent bound a store's requests (null: no limit of its own); a request past
-- either is answered 429 with Retry-After. A suspended store (suspended_at set) is answered 403 on
-- every surface and keeps its data; it may be resumed, or deleted once its retention has passed
-- (delete_after, set when it is suspended). Removing a store is never silent: every act is a row of
-- tenant_log, which outlives the store it names and holds no data of it.
--
-- Neither table is tenant data (no row-level security): they are the operator's.

alter table tenants
    add column max_rps        integer check (max_rps > 0),
    add column max_concurrent integer check (max_concurrent > 0),
    add column suspended_at   timestamptz,
    add column delete_after   timestamptz,
    add column deleted_at     timestamptz,
    add check (delete_after is null or suspended_at is not null);

create table tenant_log (
    id       bigint      generated always as identity primary key,
    account  text        not null,
    act      text        not null,  -- created, limits_set, suspended, resumed, exported, deleted
    actor    text        not null,  -- who: the operating-system user, or the key that asked
    detail   jsonb       not null default '{}',
    at       timestamptz not null default clock_timestamp()
);

create index tenant_log_account on tenant_log (account, at);
