#!/bin/sh
# The node's entry point: refuses to start without the secrets Patroni needs, then becomes Patroni.
set -eu
for name in PATRONI_NAME PATRONI_SUPERUSER_PASSWORD PATRONI_REPLICATION_PASSWORD GIFTCARD_DB_PASSWORD; do
    eval "value=\${$name:-}"
    if [ -z "$value" ]; then
        echo "set $name" >&2
        exit 1
    fi
done
exec patroni /etc/patroni/patroni.yml
