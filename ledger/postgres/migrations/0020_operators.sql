-- Operators, who may read every store's audit, and the audit verify runs that covered every store.
--
-- A key marked operator (`giftcard keys create --operator`) still belongs to one tenant and acts
-- in it on every surface; only the auditor's pages and audit API let it name another tenant
-- (?tenant=ACCOUNT) or read every one at once. The environment's hub pair is an operator's too.
--
-- A verify run over every tenant (`giftcard audit verify` without --tenant) is the operator's:
-- it is recorded with the tenant '*', which the policy tenant_rows shows only in the operator's
-- scope ('*'), never in one store's: its failures name other stores' cards.

alter table api_keys add column operator boolean not null default false;

alter table verify_runs drop constraint verify_runs_tenant_is_an_account,
    add constraint verify_runs_tenant_is_an_account
        check (tenant_id ~ '^[a-z0-9][a-z0-9-]{0,62}$' or tenant_id = '*') not valid;
