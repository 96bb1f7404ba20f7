-- The policy tenant_rows (0016) reads the scope once per statement, not once per row.
--
-- As written in 0016, PostgreSQL evaluated current_setting() twice and string_to_array() once for
-- every row a statement looked at: about 1 microsecond a row, which is 6 times what counting the rows
-- costs, and a projection's batch updates read a whole read model when it is small enough to scan.
-- Each reading of the setting is now a scalar subquery, which PostgreSQL runs once per statement
-- (an InitPlan) and hands to every row as a parameter, and one store's scope a plain equality. No
-- scope is a list any more: a group commit of several stores' Debits runs in every store's scope
-- and holds each row to its stream's store itself (ledger.eventstore.store's _APPEND_EACH), where a
-- list made of the rows' own tenants checked nothing a row could not claim. What the policy lets
-- through is otherwise unchanged: '*' every row, an account its rows, an empty or unset scope none.
-- (A process of an earlier release, still naming a list, has its group commits of several stores
-- refused, nothing written: stop those before this runs, as the README says.)
--
-- It also changes what the planner expects of the policy. 0016's form, with no statistics on
-- tenant_id (a young table; the column 0016 added to an old one, until the next ANALYZE), was
-- estimated to let almost no row through, so a source's last event, or its next ones after a
-- checkpoint, was found by reading the whole source (a bitmap scan, then a sort): in every
-- transaction that appends (events_take_seq), at every head and batch of the projection runner, a
-- cost that grew with the log, 2 to 4 ms at 20,000 events on a 2-core machine. Now such reads take
-- the index on (source, seq) and stop at the first rows.
--
-- Not on a table Citus has distributed (events, snapshots, card_lookup on a coordinator): Citus
-- refuses a subquery in their policy, and ledger.postgres.distribution gives them 0016's form back
-- before it distributes them.
do $$
declare
    t regclass;
    distributed boolean;
begin
    for t in select format('%I.%I', schemaname, tablename)::regclass from pg_policies where policyname = 'tenant_rows' loop
        distributed := false;
        if to_regclass('pg_dist_partition') is not null then
            execute 'select exists (select 1 from pg_dist_partition where logicalrelid = $1)' into distributed using t;
        end if;
        continue when distributed;
        execute format(
            $f$alter policy tenant_rows on %s
                   using ((select current_setting('giftcard.tenant', true) = '*')
                          or tenant_id = (select current_setting('giftcard.tenant', true)))$f$,
            t);
    end loop;
end
$$;
