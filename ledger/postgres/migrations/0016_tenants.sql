-- Many stores on one deployment: a tenant is a store, named by its VTEX account. Every row of a
-- store's data carries its tenant_id, and PostgreSQL itself keeps the stores apart: row-level
-- security is enabled and forced on every such table (so the tables' owner is held to it too;
-- only a superuser or a BYPASSRLS role is not), with one policy, tenant_rows.
--
-- The service names the tenants a statement may touch in the setting giftcard.tenant
-- (ledger.postgres.tenancy): one account for a request, a comma-separated list for a group
-- commit of several stores' Debits, '*' for the operator's own work (projection runner, webhook
-- deliverer, hold sweeper, command-line tools). Unset or empty, a statement sees no row and may
-- write none: a query that forgets its tenant finds nothing rather than another store's data.
--
-- A new row's tenant_id defaults to the one tenant in scope, so a store's writes need not name it;
-- under '*' or no scope (the operator's tools: a bulk issue, a recorded verify run) to the default
-- tenant; a row written under a list must name its tenant (the check refuses a list).
--
-- Existing rows become the default tenant: the account upgrade() sets in giftcard.default_tenant
-- (GIFTCARD_DEFAULT_TENANT), 'default' when unset. The column is added with a constant default
-- and the check NOT VALID, so no table is rewritten or scanned; only the lookup indexes that now
-- hold the tenant are rebuilt.
--
-- Not tenant data, and so without tenant_id: tenants itself, instance_secrets (keys of the
-- deployment), schema_migrations, projection_checkpoints (one projection runs for every store).

create table tenants (
    account     text        primary key check (account ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    created_at  timestamptz not null default clock_timestamp()
);

do $$
declare
    default_tenant text := coalesce(nullif(current_setting('giftcard.default_tenant', true), ''), 'default');
    tenant_data text[] := array[
        'events', 'snapshots', 'card_lookup', 'api_keys', 'providers', 'lookup_failures',
        'webhook_subscriptions', 'webhook_dead_letters', 'verify_runs', 'personal_data_keys',
        'read_card_balances', 'read_card_balance_transactions', 'read_transactions',
        'read_transaction_operations', 'read_history_cards', 'read_daily_totals', 'read_daily_totals_cards',
        'read_daily_totals_transactions', 'read_daily_totals_forwarded_requests'
    ];
    t text;
    distributed boolean;
begin
    if default_tenant !~ '^[a-z0-9][a-z0-9-]{0,62}$' then
        raise exception 'the default tenant % is not a VTEX account name (^[a-z0-9][a-z0-9-]{0,62}$)', default_tenant;
    end if;
    insert into tenants (account) values (default_tenant);
    -- For a statement that names each row's tenant (group commit) run where no one tenant is in
    -- scope, as the column defaults below fall back to the same tenant.
    execute format('create function default_tenant() returns text language sql immutable as %L',
                   format('select %L::text', default_tenant));
    foreach t in array tenant_data loop
        execute format('alter table %I add column tenant_id text not null default %L', t, default_tenant);
        execute format(
            $f$alter table %I alter column tenant_id set default
                   coalesce(nullif(nullif(current_setting('giftcard.tenant', true), ''), '*'), %L)$f$,
            t, default_tenant);
        execute format(
            $f$alter table %I add constraint %I check (tenant_id ~ '^[a-z0-9][a-z0-9-]{0,62}$') not valid$f$,
            t, t || '_tenant_is_an_account');
        -- Tables already distributed on Citus stay out of it, as ledger.postgres.distribution says why.
        distributed := false;
        if to_regclass('pg_dist_partition') is not null then
            execute 'select exists (select 1 from pg_dist_partition where logicalrelid = $1::regclass)'
                into distributed using t;
        end if;
        if not distributed then
            execute format('alter table %I enable row level security', t);
            execute format('alter table %I force row level security', t);
        end if;
        execute format(
            $f$create policy tenant_rows on %I
                   using (tenant_id = any(string_to_array(current_setting('giftcard.tenant', true), ','))
                          or current_setting('giftcard.tenant', true) = '*')$f$,
            t);
    end loop;
end
$$;

-- The tenant is part of every key a store chooses or a lookup finds rows by: two stores may hold
-- the same redemption code, relationName or provider id, and a lookup never crosses.
-- The constraints keep their names: the service tells a duplicate relationName by its constraint.
alter table card_lookup drop constraint card_lookup_code_hash_key,
    add constraint card_lookup_code_hash_key unique (tenant_id, code_hash);
alter table card_lookup drop constraint card_lookup_relation_name_key,
    add constraint card_lookup_relation_name_key unique (tenant_id, relation_name);
alter table providers drop constraint providers_pkey, add constraint providers_pkey primary key (tenant_id, id);
alter table lookup_failures drop constraint lookup_failures_pkey,
    add constraint lookup_failures_pkey primary key (tenant_id, subject, bucket);
drop index api_keys_one_bootstrap;
create unique index api_keys_one_bootstrap on api_keys (tenant_id, audience) where bootstrap;
drop index read_daily_totals_key;
create unique index read_daily_totals_key on read_daily_totals (tenant_id, day, provider, (coalesce(currency, '')));

-- A source's last seq is every store's: the commit order is one per source, whoever's rows it
-- holds. The lookup runs in the operator's scope for that one statement, else it would see only
-- the rows of the tenants in scope and hand out a seq another store's event already has. It reads
-- the last row rather than max(seq): under the policy's filter PostgreSQL no longer turns max()
-- into one index probe, and scanned the whole source (2 ms a transaction at 2,000 events).
create or replace function events_take_seq() returns trigger language plpgsql as $$
declare
    source_id bigint := coalesce(substring(tg_table_name from '^events_(\d+)$')::bigint, event_lane(new.stream_id));
    counter text := 'giftcard.last_seq_' || source_id;
    last_seq bigint;
    scope text;
begin
    if new.seq is not null then
        return new;
    end if;
    last_seq := nullif(current_setting(counter, true), '')::bigint;
    if last_seq is null then
        if current_setting('transaction_isolation') <> 'read committed' then
            raise exception 'events are appended in READ COMMITTED transactions only (this one is %)',
                current_setting('transaction_isolation');
        end if;
        perform pg_advisory_xact_lock(hashtextextended(counter, 0));
        scope := coalesce(current_setting('giftcard.tenant', true), '');
        perform set_config('giftcard.tenant', '*', true);
        execute format('select seq from %I.%I where source = $1 order by seq desc limit 1', tg_table_schema,
                       tg_table_name)
            into last_seq using source_id;
        last_seq := coalesce(last_seq, 0);
        perform set_config('giftcard.tenant', scope, true);
    end if;
    new.source := source_id;
    new.seq := last_seq + 1;
    perform set_config(counter, new.seq::text, true);
    return new;
end
$$;
