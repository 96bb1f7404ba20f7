"""Reference servers for ``bench.http_debits``: the same Debit route, built two other ways."""
