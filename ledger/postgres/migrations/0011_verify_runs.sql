-- Each `giftcard audit verify` run, recorded when it completes, so that the auditor's view
-- (GET /audit) can show the latest result. What is kept is the run's summary: its report is
-- printed by the command, and every failure of it can be found again by running it again.
--
-- Amounts in `totals` are JSON numbers in major units of their currency (exact: jsonb keeps
-- numerics as written), as `giftcard audit verify --json` prints them.

create table verify_runs (
    id             bigint      generated always as identity primary key,
    started_at     timestamptz not null,
    finished_at    timestamptz not null,
    ok             boolean     not null,  -- every rule held
    events         bigint      not null,  -- events walked
    streams        bigint      not null,
    cards          bigint      not null,
    failures_total bigint      not null,
    failures       jsonb       not null,  -- the first few: [{streamId, version, position, rule, message}]
    totals         jsonb       not null,  -- [{provider, currency, kind, operation, count, amount}]
    read_models    jsonb       not null,  -- [{name, checkpoint: {tx, position}, compared, lagEvents}]
    check (finished_at >= started_at),
    check (ok = (failures_total = 0))
);

create index verify_runs_latest on verify_runs (finished_at desc, id desc);
