-- events_take_seq, the trigger that gives every appended row its source and seq, without the
-- statements PL/pgSQL runs through SPI where an expression does.
--
-- A group commit of eight Debits writes to about six sources, so most of its rows take the slow
-- path (lock the source, read its last seq). In 0024 that path ran six statements through SPI (the
-- lock, the four settings saved and set, the probe, the floor, the settings restored) and every row
-- one more (its source's counter): an executor started and stopped for each, about 60 µs a row on a
-- small machine, a third of PostgreSQL's work on the group commit's insert (perf). A function call
-- assigned to a variable is a "simple expression", which PL/pgSQL evaluates without SPI, and the
-- probe and the floor are one statement: one SPI statement a source, none a row (pgbench of the
-- group commit's insert, docs/benchmarks.md). What it does is unchanged; a Citus shard
-- (events_<id>) still reads with EXECUTE, and has no floors.

create or replace function events_take_seq() returns trigger language plpgsql as $$
declare
    one_server boolean := tg_table_schema = 'public' and tg_table_name = 'events';
    source_id bigint := case when one_server then event_lane(new.stream_id)
                             else substring(tg_table_name from '^events_(\d+)$')::bigint end;
    counter text := 'giftcard.last_seq_' || source_id;
    last_seq bigint;
    scope text;
    bitmaps text;
    seqscans text;
    plans text;
    ignored text;  -- what the set_config calls answer, assigned so that none is a statement
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
        ignored := pg_advisory_xact_lock(hashtextextended(counter, 0))::text;
        scope := coalesce(current_setting('giftcard.tenant', true), '');
        bitmaps := current_setting('enable_bitmapscan');
        seqscans := current_setting('enable_seqscan');
        plans := current_setting('plan_cache_mode');
        ignored := set_config('giftcard.tenant', '*', true);
        ignored := set_config('enable_bitmapscan', 'off', true);
        ignored := set_config('enable_seqscan', 'off', true);
        ignored := set_config('plan_cache_mode', 'force_generic_plan', true);
        if one_server then
            select greatest(
                       coalesce((select seq from public.events where source = source_id order by seq desc limit 1), 0),
                       coalesce((select f.seq from event_seq_floors f where f.source = source_id), 0))
            into last_seq;
        else
            execute format('select seq from %I.%I where source = $1 order by seq desc limit 1', tg_table_schema,
                           tg_table_name)
                into last_seq using source_id;
            last_seq := coalesce(last_seq, 0);
        end if;
        ignored := set_config('giftcard.tenant', scope, true);
        ignored := set_config('enable_bitmapscan', bitmaps, true);
        ignored := set_config('enable_seqscan', seqscans, true);
        ignored := set_config('plan_cache_mode', plans, true);
    end if;
    new.source := source_id;
    new.seq := last_seq + 1;
    ignored := set_config(counter, new.seq::text, true);
    return new;
end
$$;
