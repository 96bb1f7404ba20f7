"""PostgreSQL plumbing: where the database comes from, migrations, replication, Citus distribution, keys and ciphers."""
