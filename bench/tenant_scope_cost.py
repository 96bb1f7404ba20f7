"""What taking the tenant scope to Citus workers costs a statement on one server.

Every statement of the service's pools passes ``ScopedConnection``'s check of whether it must run
in a transaction that sets the scope on the workers (ledger.postgres.tenancy); on one server the
answer is always no. Measured on a real connection, in process: the check alone, and a round trip
(``select 1``) through ``ScopedConnection`` and through asyncpg's own ``Connection``, each figure
the best of ``ROUNDS`` loops, in nanoseconds per statement. The round trips differ by less than
their own noise on a shared machine; the check is the part that is ours.

    python -m bench.tenant_scope_cost [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg

from bench.arguments import add_database_url
from bench.event_store_appends import database_server
from ledger.postgres.database import connect_options
from ledger.postgres.tenancy import ScopedConnection

CHECKS = 300_000
ROUND_TRIPS = 5_000
ROUNDS = 5
QUERY = "select count(*) from events where stream_id = $1"  # a statement that names a table of the workers


def best_ns(calls: int, call: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e9


async def best_round_trip_ns(call: Callable[[], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(ROUND_TRIPS):
            await call()
        best = min(best, (time.perf_counter() - started) / ROUND_TRIPS)
    return best * 1e9


async def main(url: str) -> None:
    scoped = await asyncpg.connect(url, connection_class=ScopedConnection, **connect_options())
    plain = await asyncpg.connect(url, **connect_options())
    try:
        await scoped.enter_scope("acme")  # as a request of one store holds its connection
        check = best_ns(CHECKS, lambda: scoped._runs_in_a_scoped_transaction(QUERY))
        nothing = best_ns(CHECKS, lambda: None)
        through_scoped = await best_round_trip_ns(lambda: scoped.fetchval("select 1"))
        through_plain = await best_round_trip_ns(lambda: plain.fetchval("select 1"))
    finally:
        await scoped.close()
        await plain.close()
    print(f"the check, one server:              {check - nothing:8.0f} ns per statement")
    print(f"select 1 through ScopedConnection:  {through_scoped:8.0f} ns")
    print(f"select 1 through asyncpg.Connection:{through_plain:8.0f} ns")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_database_url(parser, "the server to connect to (nothing is written)")
    arguments = parser.parse_args()
    with database_server(arguments.database_url) as server_url:
        asyncio.run(main(server_url))
