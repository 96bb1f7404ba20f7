-- The hold-expiry sweeper (ledger/application/hold_expiry.py) looks for native Debits that still hold
-- money, oldest first; this index holds just those rows, so a sweep stays cheap however long
-- the history grows.

create index read_transactions_open_holds on read_transactions (date)
    where source = 'ledger' and operation = 'Debit' and value > settled + coalesce(released, 0);
