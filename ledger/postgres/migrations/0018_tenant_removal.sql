-- Removing a store (giftcard tenants delete): the one way events are ever deleted.
--
-- Events stay immutable (migration 0001's triggers) except for a deliberate removal: a DELETE of a
-- row passes only when the session names that row's tenant in giftcard.removing_tenant (set by
-- ledger.postgres.tenants.delete_tenant and nothing else) AND that tenant is suspended with its
-- retention passed (tenants.delete_after). UPDATE and TRUNCATE are refused as before, and the
-- service's role still has no DELETE privilege on events at all (giftcard db grant): only the
-- schema's owner can remove a store, and only a store whose retention has run out.

create or replace function events_refuse_change() returns trigger language plpgsql as $$
begin
    -- Nested: a statement-level trigger (TRUNCATE) has no OLD row to read.
    -- Nested again: the tenants table is read only once a removal is under way, as on a Citus
    -- worker's shard, which has no tenants table, a refused change must still say "immutable".
    if tg_op = 'DELETE' and old.tenant_id = current_setting('giftcard.removing_tenant', true) then
        if exists (select 1 from tenants t
                   where t.account = old.tenant_id and t.suspended_at is not null
                     and t.delete_after <= clock_timestamp()) then
            return old;
        end if;
    end if;
    raise exception 'events are immutable: % on events refused', tg_op
        using errcode = 'insufficient_privilege';
end
$$;

-- A removed store's events leave gaps in the commit order of their sources, which readers skip
-- (ledger/eventstore/commit_order.py). But where they were a source's last events, the next
-- append would read a lower last seq and take again a number a reader has already passed: a
-- projection or webhook subscription would never see that event. So a removal records each
-- source's highest removed seq here, and the next seq is taken above it.
create table event_seq_floors (
    source  bigint primary key,
    seq     bigint not null
);

-- Read by the seq trigger in every appending session, the service's role included (whose grants,
-- from giftcard db grant, may predate this table). It holds only positions, no store's data.
grant select on event_seq_floors to public;

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
        -- Only on one server: a Citus shard (events_<id>, on a worker) has no floors, and no store
        -- is removed there (giftcard tenants delete refuses).
        if tg_table_name = 'events' then
            last_seq := greatest(last_seq, coalesce((select f.seq from event_seq_floors f where f.source = source_id), 0));
        end if;
        perform set_config('giftcard.tenant', scope, true);
    end if;
    new.source := source_id;
    new.seq := last_seq + 1;
    perform set_config(counter, new.seq::text, true);
    return new;
end
$$;
