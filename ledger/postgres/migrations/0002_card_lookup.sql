-- Strongly consistent lookups of native cards, written in the same transaction as the
-- Issued event: by redemption code (stored only as a keyed hash) and by owner.

create table card_lookup (
    card_id        text primary key,
    code_hash      bytea not null unique,
    relation_name  text  not null unique,
    profile_id     text  not null
);

create index card_lookup_profile on card_lookup (profile_id);

-- Instance-wide secrets generated on first start when none is configured
-- (for example the key that hashes redemption codes).
create table instance_secrets (
    name       text primary key,
    value      bytea not null,
    created_at timestamptz not null default clock_timestamp()
);
