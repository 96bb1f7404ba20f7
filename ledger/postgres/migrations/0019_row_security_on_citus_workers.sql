-- Row-level security on the tables whose rows live on Citus workers (events, snapshots,
-- card_lookup). Until now a Citus coordinator turned it off there when it distributed them: the
-- workers never saw the tenant scope, which the service set for its coordinator session only. The
-- service now takes the scope to the workers (SET LOCAL, which Citus sends on with
-- citus.propagate_set_commands = 'local'; the distributed functions take it as an argument), so the
-- boundary holds on the workers as on one server, and a Citus deployment serves every tenant.
--
-- On one server these tables have had it since 0016, and this changes nothing. On Citus, ALTER
-- TABLE on a distributed or reference table reaches every shard placement.
alter table events enable row level security, force row level security;
alter table snapshots enable row level security, force row level security;
alter table card_lookup enable row level security, force row level security;
