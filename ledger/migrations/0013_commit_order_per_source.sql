-- The commit order per source (ledger/commit_order.py), in place of one server's (tx, position).
--
-- source  where the event was written under one lock: 0 for the events table of one server, the
--         shard's id on Citus (a shard's rows are the table events_<id> on its worker)
-- seq     1, 2, 3... inside its source, taken in the source's commit order, without gaps
--
-- Readers followed (tx, position) and stopped below the oldest transaction still running on the
-- server, in any database: one long transaction anywhere stalled every projection, and on Citus
-- each node has transaction ids of its own. A seq taken under a lock held until commit needs
-- neither: a reader that sees seq n has seen every seq before it.

alter table events add column source bigint, add column seq bigint;

-- Existing events take their place in the order they were followed in until now.
alter table events disable trigger events_no_update_or_delete;
update events e set source = 0, seq = o.seq
from (select position, row_number() over (order by tx, position) as seq from events) o
where e.position = o.position;
alter table events enable trigger events_no_update_or_delete;

alter table events alter column source set not null, alter column seq set not null;
create index events_source_order on events (source, seq);
drop index events_commit_order;

-- Takes the next seq of the table's source. The first insert of a transaction into a source waits
-- for the source's lock (held until the transaction ends, so seqs commit in their order) and
-- reads the source's last seq; the transaction's later inserts count on from a setting local to
-- it (rolled back with it, or with its savepoint). A row that arrives with its seq already set is
-- a copy of a stored event (Citus moving a shard to another worker, a restore) and keeps it.
-- Only READ COMMITTED sees the seq the previous lock holder committed.
create function events_take_seq() returns trigger language plpgsql as $$
declare
    source_id bigint := coalesce(substring(tg_table_name from '^events_(\d+)$')::bigint, 0);
    counter text := 'giftcard.last_seq_' || source_id;
    last_seq bigint := nullif(current_setting(counter, true), '')::bigint;
begin
    if new.seq is not null then
        return new;
    end if;
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
alter table projection_checkpoints add column checkpoint jsonb not null default '{}';
update projection_checkpoints c set checkpoint = jsonb_build_object('0', e.seq)
from events e where e.position = c.position;
alter table projection_checkpoints drop column tx, drop column position;

alter table webhook_subscriptions add column checkpoint jsonb not null default '{}';
update webhook_subscriptions s set checkpoint = jsonb_build_object('0', e.seq)
from events e where e.position = s.position;
alter table webhook_subscriptions drop column tx, drop column position;
