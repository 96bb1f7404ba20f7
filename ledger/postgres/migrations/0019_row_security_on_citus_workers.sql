-- Row-level security on the tables whose rows live on Citus workers (events, snapshots,
-- card_lookup). Until now a Citus coordinator turned it off there when it distributed them: the
-- workers never saw the tenant scope, which the service set for its coordinator session only. The
-- service now takes the scope to the workers (SET LOCAL, which Citus sends on with
-- citus.propagate_set_commands = 'local'; the functions run on a worker take it as an argument),
-- so the boundary holds on the workers as on one server, and a Citus deployment serves every tenant.
--
-- On one server these tables have had it, enabled and forced, since 0016: this changes nothing. On
-- Citus, ALTER TABLE on a distributed or reference table reaches every shard placement; there it is
-- enabled but not forced, as ledger.postgres.distribution says why (the tables' owner, who moves
-- shards, is not held to it; the service's role, which is not the owner, is).
do $$
declare
    t text;
    distributed boolean;
begin
    foreach t in array array['events', 'snapshots', 'card_lookup'] loop
        execute format('alter table %I enable row level security', t);
        distributed := false;
        if to_regclass('pg_dist_partition') is not null then
            execute 'select exists (select 1 from pg_dist_partition where logicalrelid = $1::regclass)'
                into distributed using t;
        end if;
        if not distributed then
            execute format('alter table %I force row level security', t);
        end if;
    end loop;
end
$$;
