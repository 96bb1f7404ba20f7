"""Finance exports: transactions and liabilities, streamed from the events, with their totals."""
