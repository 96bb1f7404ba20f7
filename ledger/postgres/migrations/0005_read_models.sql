-- Read models: tables derived from the events by the projection runner (projections/).
--
-- Nothing here is a source of truth: every row follows from the events table, and
-- `giftcard projections rebuild NAME` recomputes a projection's tables from zero.
-- Amounts are integer minor units of `currency`. The currency of an external provider's
-- card is not known to the hub: there `currency` is null and amounts are in units of
-- 10^-4 (the finest ISO 4217 exponent), so that every amount stays an exact integer.


-- ---- checkpoints ---------------------------------------------------------------------------
-- One row per projection: the last event applied, in the global (tx, position) order.
-- A batch updates its read model and this row in ONE transaction, so after a crash the
-- projection resumes exactly after the last batch that committed: no event lost or applied twice.

create table projection_checkpoints (
    name            text primary key,
    tx              xid8        not null default '0',
    position        bigint      not null default 0,
    events_applied  bigint      not null default 0,   -- events read so far, ignored ones included
    last_event_at   timestamptz,                      -- recorded_at of the last event applied
    updated_at      timestamptz not null default clock_timestamp(),
    rebuilt_at      timestamptz                       -- when a rebuild last replaced its tables
);

-- The runner also adds any projection it knows of; seeding them here means every read model
-- reports its freshness (all events behind) even before a runner first starts.
insert into projection_checkpoints (name) values ('card_balances'), ('transaction_history'), ('daily_totals');


-- ---- card_balances -------------------------------------------------------------------------
-- One row per native card. credited and debited are net of their cancellations, settled is
-- captured less refunded, authorized is what Debits still hold; the checks are the ledger's
-- own arithmetic, so a projection bug stops the runner instead of publishing a wrong balance.

create table read_card_balances (
    card_id           text primary key,
    currency          text        not null,
    available         bigint      not null default 0,
    authorized        bigint      not null default 0,
    settled           bigint      not null default 0,
    credited          bigint      not null default 0,
    debited           bigint      not null default 0,
    relation_name     text        not null,
    emission_date     timestamptz not null,
    expiring_date     timestamptz not null,
    issued_at         timestamptz not null,
    last_activity_at  timestamptz not null,
    check (available = credited - debited),
    check (debited = authorized + settled),
    check (available >= 0 and authorized >= 0 and settled >= 0 and credited >= 0 and debited >= 0)
);

create index read_card_balances_by_issue on read_card_balances (issued_at, card_id);

-- Private to card_balances: whether a settlement or cancellation touches a Credit or a Debit.
create table read_card_balance_transactions (
    card_id         text not null,
    transaction_id  text not null,
    operation       text not null check (operation in ('Credit', 'Debit')),
    primary key (card_id, transaction_id)
);


-- ---- transaction_history -------------------------------------------------------------------
-- Every transaction, native or forwarded to an external provider, with its settlements and
-- cancellations. For a forwarded transaction the hub records neither its direction (operation)
-- nor its currency, and a settlement may name a transaction whose creation it never saw
-- (value null): those columns are null rather than guessed.

create table read_transactions (
    provider        text        not null,
    card_id         text        not null,
    transaction_id  text        not null,
    source          text        not null check (source in ('ledger', 'forwarded')),
    operation       text        check (operation in ('Credit', 'Debit')),
    currency        text,
    value           bigint,
    settled         bigint      not null default 0,   -- sum of its settlements
    cancelled       bigint      not null default 0,   -- sum of its cancellations
    released        bigint,                           -- of cancelled: released from the hold (native)
    refunded        bigint,                           -- of cancelled: refunded after settlement (native)
    description     text,
    request_id      text,
    order_id        text,                             -- orderInfo.orderId, when the caller sent one
    date            timestamptz not null,
    position        bigint      not null,             -- the event that created the row: breaks ties in date
    primary key (provider, card_id, transaction_id)
);

create index read_transactions_by_date on read_transactions (date, position);
create index read_transactions_by_card on read_transactions (card_id, date, position);
create index read_transactions_by_order on read_transactions (order_id) where order_id is not null;
-- A create-transaction forwarded again with the same requestId got the original back: one transaction.
create unique index read_transactions_forwarded_request on read_transactions (provider, card_id, request_id)
    where source = 'forwarded' and request_id is not null;

create table read_transaction_operations (
    provider        text        not null,
    card_id         text        not null,
    transaction_id  text        not null,
    oid             text        not null,
    kind            text        not null check (kind in ('settlement', 'cancellation')),
    value           bigint      not null,
    released        bigint,
    refunded        bigint,
    request_id      text,
    date            timestamptz not null,
    position        bigint      not null,
    primary key (provider, card_id, transaction_id, oid),
    foreign key (provider, card_id, transaction_id) references read_transactions
);

-- Private to transaction_history: a native card's currency, known from its Issued event.
create table read_history_cards (
    card_id   text primary key,
    currency  text not null
);


-- ---- daily_totals --------------------------------------------------------------------------
-- Flows per UTC day, currency and provider. balance_change is the net change of the balances
-- native cards hold; its running sum is the outstanding liability at the end of each day
-- (computed when read, so a late day never rewrites the days after it).

create table read_daily_totals (
    day             date    not null,
    currency        text,                              -- null: an external provider's, not recorded
    provider        text    not null,
    cards_issued    integer not null default 0,
    transactions    integer not null default 0,
    loaded          bigint  not null default 0,        -- Credit transactions created
    redeemed        bigint  not null default 0,        -- Debit transactions created (authorized)
    unclassified    bigint  not null default 0,        -- forwarded transactions of unrecorded direction
    settled         bigint  not null default 0,
    cancelled       bigint  not null default 0,
    balance_change  bigint  not null default 0
);

create unique index read_daily_totals_key on read_daily_totals (day, provider, (coalesce(currency, '')));

-- Private to daily_totals: card currencies and transaction directions, for later events.
create table read_daily_totals_cards (
    card_id   text primary key,
    currency  text not null
);

create table read_daily_totals_transactions (
    card_id         text not null,
    transaction_id  text not null,
    operation       text not null check (operation in ('Credit', 'Debit')),
    primary key (card_id, transaction_id)
);

-- Private to daily_totals: forwarded create-transactions already counted, so a replay
-- (same provider, card and requestId, answered with the original) is not counted twice.
create table read_daily_totals_forwarded_requests (
    provider    text not null,
    card_id     text not null,
    request_id  text not null,
    primary key (provider, card_id, request_id)
);
