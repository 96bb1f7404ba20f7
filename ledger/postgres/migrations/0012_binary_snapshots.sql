-- Snapshots become MessagePack in bytea. A card with 10,000 transactions holds megabytes of
-- state; as jsonb, PostgreSQL spent tens of milliseconds turning it into text and the service
-- as many parsing it back. Snapshots are a disposable cache: replacing the table loses nothing,
-- the next commands on each card write new ones.

drop table snapshots;

create table snapshots (
    stream_id  text primary key,
    version    integer     not null,
    hash       bytea       not null,
    state      bytea       not null,
    taken_at   timestamptz not null default clock_timestamp()
);
