-- The commit order per source (ledger/eventstore/commit_order.py), in place of one server's (tx, position).
--
-- source  where the event was written under one lock: on one server one of 16 lanes, picked by
--         the stream's hash (event_lane), so that appends to different lanes commit side by side;
--         on Citus the shard's id (a shard's rows are the table events_<id> on its worker)
-- seq     1, 2, 3... inside its source, taken in the source's commit order (a row refused at insert
--         by on conflict do nothing has taken its number first: that number stays unused)
--
-- Readers followed (tx, position) and stopped below the oldest transaction still running on the
-- server, in any database: one long transaction anywhere stalled every projection, and on Citus
-- each node has transaction ids of its own. A seq taken under a lock held until commit needs
-- neither: a reader that sees seq n has seen every seq before it.

alter table events add column source bigint, add column seq bigint;

-- A stream's lane on one server, for ever: a card's events must stay in one source to keep their order.
create function event_lanes() returns integer language sql immutable as 'select 16';
create function event_lane(stream_id text) returns bigint language sql immutable parallel safe as $$
    select abs(hashtextextended(stream_id, 0) % event_lanes())
$$;

-- Existing events take their place in the order they were followed in until now.
alter table events disable trigger events_no_update_or_delete;
update events e set source = o.source, seq = o.seq
from (select position, event_lane(stream_id) as source,
             row_number() over (partition by event_lane(stream_id) order by tx, position) as seq
      from events) o
where e.position = o.position;
alter table events enable trigger events_no_update_or_delete;

alter table events alter column source set not null, alter column seq set not null;
create index events_source_order on events (source, seq);
drop index events_commit_order;

-- Takes the next seq of the row's source. The first insert of a transaction into a source waits
-- for the source's lock (held until the transaction ends, so seqs commit in their order) and
-- reads the source's last seq; the transaction's later inserts count on from a setting local to
-- it (rolled back with it, or with its savepoint). A row that arrives with its seq already set is
-- a copy of a stored event (Citus moving a shard to another worker, a restore) and keeps it.
-- Only READ COMMITTED sees the seq the previous lock holder committed. A transaction writing to
-- several sources takes their locks in the order of its rows: statements that write many insert
-- them in source order (ledger/eventstore/store.py), so that two of them never wait for each other in a cycle.
create function events_take_seq() returns trigger language plpgsql as $$
declare
    source_id bigint := coalesce(substring(tg_table_name from '^events_(\d+)$')::bigint, event_lane(new.stream_id));
    counter text := 'giftcard.last_seq_' || source_id;
    last_seq bigint;
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
        execute format('select coalesce(max(seq), 0) from %I.%I where source = $1', tg_table_schema, tg_table_name)
            into last_seq using source_id;
    end if;
    new.source := source_id;
    new.seq := last_seq + 1;
    perform set_config(counter, new.seq::text, true);
    return new;
end
$$;

create trigger events_take_seq before insert on events for each row execute function events_take_seq();

-- Readers' places: the last seq read from each source, as {"source": seq}.
-- A reader at event E has read, in every lane, what committed before E (the old order was one).
create function pg_temp.checkpoint_at(at_position bigint) returns jsonb language sql stable as $$
    select coalesce((
        select jsonb_object_agg(l.source, l.seq) from (
            select e.source, max(e.seq) as seq from events e, events at
            where at.position = at_position and (e.tx, e.position) <= (at.tx, at.position) group by e.source) l
    ), '{}')
$$;

alter table projection_checkpoints add column checkpoint jsonb not null default '{}';
update projection_checkpoints set checkpoint = pg_temp.checkpoint_at(position);
alter table projection_checkpoints drop column tx, drop column position;

alter table webhook_subscriptions add column checkpoint jsonb not null default '{}';
update webhook_subscriptions set checkpoint = pg_temp.checkpoint_at(position);
alter table webhook_subscriptions drop column tx, drop column position;

drop function pg_temp.checkpoint_at(bigint);
