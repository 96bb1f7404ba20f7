#!/bin/sh
# Run by the postgres image once, when it initialises an empty volume (docker-entrypoint-initdb.d):
# the role the hub and the projection worker connect as. It owns nothing; the `migrate` service's
# `giftcard db grant giftcard_app` gives it what the service needs, and no rewriting of events.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v password="$GIFTCARD_APP_DB_PASSWORD" <<'SQL'
create role giftcard_app login password :'password';
SQL
