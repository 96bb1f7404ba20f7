-- Outbound events (webhooks): subscribers receive ledger events as signed JSON POSTs.
--
-- There is no outbox: the events table already is one. Each subscription follows the global
-- (tx, position) order from its own checkpoint, like a projection, and a POST that succeeds
-- moves the checkpoint. Nothing here is written in the transaction that appends an event.


-- ---- subscriptions -------------------------------------------------------------------------
-- secret     the signing secret, AES-256-GCM sealed with a key derived from GIFTCARD_SECRET_KEY
--            (ledger/postgres/credentials_cipher.py, associated data 'webhook:' || id). It cannot be kept
--            as a hash: the deliverer needs it in clear to sign. It is shown once, at creation.
-- event_types  the public types delivered ('card.debited', ...); null means every type, including
--            types added by later versions.
-- tx, position  the checkpoint: the last event handled (delivered, filtered out or dead-lettered).
-- attempts   how many times the event just after the checkpoint has failed; the subscription is
--            blocked on it (so each card's events stay in order) until it succeeds or, after
--            GIFTCARD_WEBHOOK_ATTEMPTS_MAX failures, is moved to webhook_dead_letters.
-- next_attempt_at  when that event may be tried again (exponential backoff); null: now.

create table webhook_subscriptions (
    id                 text primary key,
    url                text        not null,
    event_types        text[],
    description        text,
    secret             text        not null,
    tx                 xid8        not null default '0',
    position           bigint      not null default 0,
    attempts           integer     not null default 0 check (attempts >= 0),
    next_attempt_at    timestamptz,
    last_error         text,
    delivered          bigint      not null default 0,
    last_delivered_at  timestamptz,
    created_at         timestamptz not null default clock_timestamp()
);


-- ---- dead letters --------------------------------------------------------------------------
-- An event a subscriber refused (or could not be reached for) attempts_max times in a row. body
-- is the exact JSON that was sent (re-signed with a fresh timestamp on every redelivery).
-- retry_requested: an operator asked for one more attempt (giftcard webhooks dead-letters
-- --retry); the deliverer makes it, deletes the row on success, clears the flag on failure.

create table webhook_dead_letters (
    subscription_id  text        not null references webhook_subscriptions (id) on delete cascade,
    position         bigint      not null,
    event_type       text        not null,
    subject_id       text        not null,   -- the card's (or provider's) id
    body             text        not null,
    attempts         integer     not null,
    last_error       text        not null,
    dead_at          timestamptz not null default clock_timestamp(),
    retry_requested  boolean     not null default false,
    primary key (subscription_id, position)
);

create index webhook_dead_letters_retry on webhook_dead_letters (subscription_id, position) where retry_requested;
