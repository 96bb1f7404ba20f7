-- Credentials of API callers, kept only as hashes of their tokens.
-- audience: 'hub' for hub consumers (X-VTEX-API-*), 'provider' for Provider Protocol callers
-- (X-PROVIDER-API-*). bootstrap marks the pair generated on a first start with nothing configured;
-- at most one per audience, so processes starting together print one pair, not several.

create table api_keys (
    app_key     text primary key,
    token_hash  bytea       not null,
    audience    text        not null check (audience in ('hub', 'provider')),
    roles       text[]      not null default '{view,edit}',
    bootstrap   boolean     not null default false,
    created_at  timestamptz not null default clock_timestamp(),
    revoked_at  timestamptz
);

create unique index api_keys_one_bootstrap on api_keys (audience) where bootstrap;
