-- Shoppers' personal data is stored in events encrypted under a data key of that person
-- (ledger.postgres.personal_data); the keys live here, the one table that erasure may change: forgetting a
-- person sets their keys' wrapped_key to null, and what the events hold under those keys can never
-- be read again (crypto-shredding), while the events themselves, and their hash chain, stay as they
-- were. A person may have several keys (each hub process makes its own for a person it meets
-- first); forgetting destroys all of them.
--
-- A plain table on the coordinator under Citus: only the hub reads it, never a worker.

create table personal_data_keys (
    key_id        text        primary key,  -- what an event's sealed field names ("pii")
    subject       text        not null,     -- HMAC(subject key, identifier): never the identifier itself
    wrapped_key   bytea,                    -- the data key, AES-256-GCM under a key derived from
                                            -- GIFTCARD_SECRET_KEY; null once forgotten
    created_at    timestamptz not null default clock_timestamp(),
    forgotten_at  timestamptz,
    check ((wrapped_key is null) = (forgotten_at is not null))
);

create index personal_data_keys_subject on personal_data_keys (subject);

comment on column card_lookup.profile_id is
    'HMAC(subject key, profileId) (ledger.postgres.personal_data.subject_of) for cards issued since migration 0015; '
    'the profileId itself before; empty once its person is forgotten';
