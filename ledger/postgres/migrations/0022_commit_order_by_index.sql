-- The last seq of a source, which every appending transaction reads (events_take_seq), is read by
-- its index, whatever the planner expects.
--
-- Under row-level security PostgreSQL cannot tell how many rows a policy lets through. With 0016's
-- policy, and no statistics on tenant_id (a young table, or the column 0016 added to an old one,
-- until the next ANALYZE), it expected almost none, and read the source's every row through a
-- bitmap scan, then sorted them, to find the last: a cost that grew with the log (2 to 4 ms at
-- 20,000 events on a 2-core machine), paid with the source's advisory lock held. On one server
-- 0023's policy is estimated as it should be; on Citus the shards keep 0016's (Citus takes no
-- subquery in a policy), and this is what keeps their probe one index row. Bitmap and sequential
-- scans are off for that one statement, which leaves it the index on (source, seq).

create or replace function events_take_seq() returns trigger language plpgsql as $$
declare
    source_id bigint := coalesce(substring(tg_table_name from '^events_(\d+)$')::bigint, event_lane(new.stream_id));
    counter text := 'giftcard.last_seq_' || source_id;
    last_seq bigint;
    scope text;
    bitmaps text;
    seqscans text;
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
        perform set_config('giftcard.tenant', '*', true), set_config('enable_bitmapscan', 'off', true),
                set_config('enable_seqscan', 'off', true);
        execute format('select seq from %I.%I where source = $1 order by seq desc limit 1', tg_table_schema,
                       tg_table_name)
            into last_seq using source_id;
        last_seq := coalesce(last_seq, 0);
        -- Only on one server: a Citus shard (events_<id>, on a worker) has no floors, and no store
        -- is removed there (giftcard tenants delete refuses).
        if tg_table_name = 'events' then
            last_seq := greatest(last_seq, coalesce((select f.seq from event_seq_floors f where f.source = source_id), 0));
        end if;
        perform set_config('giftcard.tenant', scope, true), set_config('enable_bitmapscan', bitmaps, true),
                set_config('enable_seqscan', seqscans, true);
    end if;
    new.source := source_id;
    new.seq := last_seq + 1;
    perform set_config(counter, new.seq::text, true);
    return new;
end
$$;
