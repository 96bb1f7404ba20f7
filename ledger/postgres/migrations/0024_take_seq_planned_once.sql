-- The last seq of a source, which every appending transaction reads (events_take_seq), is planned
-- once per connection on one server, not at every append.
--
-- 0022 read it with EXECUTE, which plans its statement afresh every time, because a Citus shard
-- (events_<id>, on a worker) is a table of another name. Under the service's role the plan includes
-- the row-level security policy: 0.07 to 0.16 ms of planning a probe, about one probe per source in
-- every group commit, up to a tenth of what PostgreSQL spent on a Debit (pg_stat_statements with
-- track_planning, docs/benchmarks.md). On one server the table is public.events, so the probe is now
-- a plain statement of the function, whose plan PL/pgSQL keeps for the connection; a generic plan
-- (the same index range for every source), chosen at once rather than after five custom ones.
-- A shard keeps EXECUTE.

create or replace function events_take_seq() returns trigger language plpgsql as $$
declare
    source_id bigint := coalesce(substring(tg_table_name from '^events_(\d+)$')::bigint, event_lane(new.stream_id));
    counter text := 'giftcard.last_seq_' || source_id;
    last_seq bigint;
    scope text;
    bitmaps text;
    seqscans text;
    plans text;
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
        bitmaps := current_setting('enable_bitmapscan');
        seqscans := current_setting('enable_seqscan');
        plans := current_setting('plan_cache_mode');
        perform set_config('giftcard.tenant', '*', true), set_config('enable_bitmapscan', 'off', true),
                set_config('enable_seqscan', 'off', true), set_config('plan_cache_mode', 'force_generic_plan', true);
        if tg_table_schema = 'public' and tg_table_name = 'events' then
            select seq into last_seq from public.events where source = source_id order by seq desc limit 1;
        else
            execute format('select seq from %I.%I where source = $1 order by seq desc limit 1', tg_table_schema,
                           tg_table_name)
                into last_seq using source_id;
        end if;
        last_seq := coalesce(last_seq, 0);
        -- Only on one server: a Citus shard (events_<id>, on a worker) has no floors, and no store
        -- is removed there (giftcard tenants delete refuses).
        if tg_table_name = 'events' then
            last_seq := greatest(last_seq, coalesce((select f.seq from event_seq_floors f where f.source = source_id), 0));
        end if;
        perform set_config('giftcard.tenant', scope, true), set_config('enable_bitmapscan', bitmaps, true),
                set_config('enable_seqscan', seqscans, true), set_config('plan_cache_mode', plans, true);
    end if;
    new.source := source_id;
    new.seq := last_seq + 1;
    perform set_config(counter, new.seq::text, true);
    return new;
end
$$;
