#!/bin/sh
# Patroni's post_bootstrap: runs once, on the node that initialised the cluster, with a
# superuser connection URL as its argument. Creates the hub's role and database.
set -eu
psql "$1" -v ON_ERROR_STOP=1 -v password="$GIFTCARD_DB_PASSWORD" <<'SQL'
create role giftcard login password :'password';
create database giftcard owner giftcard;
SQL
