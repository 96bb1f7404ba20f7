"""Where what only reads is served from, and the replica lag its answers state.

The read-model listings, the audit API and the auditor's pages take their pool from
``read_pool(request)``: the replica's (``GIFTCARD_REPLICA_URL``) when one is configured, else the
primary's, chosen once at start (``hub.app``). On a replica it measures the lag first, once per
request, so the rows read after it are at least that fresh; ``replica_lag_headers`` then puts it
on the answer (``X-Replica-Lag-Seconds``, ``X-Replica-Lag-Bytes``), JSON listings that report
their freshness carry it too (``with_replica_lag``), and the auditor's pages state it in a line of
their own (``lag_of``, ``templates/replica_lag.html.j2``). Reads from the primary change nothing.

Protocol reads of a card and every write stay on the primary (``app[LEDGER]``): they must see the
card's latest event.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from hub.http.state import POOL, READ_POOL
from ledger.postgres.replication import ReplicaLag, replica_lag

LAG_SECONDS_HEADER = "X-Replica-Lag-Seconds"
LAG_BYTES_HEADER = "X-Replica-Lag-Bytes"
_LAG = web.RequestKey("replica_lag", ReplicaLag)  # the lag measured while serving the request


def reads_from_replica(app: web.Application) -> bool:
    return app[READ_POOL] is not app[POOL]


async def read_pool(request: web.Request) -> asyncpg.Pool:
    pool = request.app[READ_POOL]
    if reads_from_replica(request.app) and _LAG not in request:
        request[_LAG] = await replica_lag(pool)
    return pool


def lag_of(request: web.Request) -> ReplicaLag | None:
    """The lag measured while serving this request; None when it read the primary (or nothing)."""
    return request.get(_LAG)


def render_lag(lag: ReplicaLag) -> dict[str, Any]:
    return {
        "lagSeconds": None if lag.seconds is None else round(lag.seconds, 3),
        "lagBytes": lag.bytes_behind,
        "inRecovery": lag.in_recovery,
    }


def with_replica_lag(request: web.Request, document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with a ``replica`` field when the request read a replica; unchanged otherwise."""
    lag = lag_of(request)
    return document if lag is None else {**document, "replica": render_lag(lag)}


@web.middleware
async def replica_lag_headers(request: web.Request, handler) -> web.StreamResponse:
    """Outside the error middleware, so a 404 read from a replica states the lag too."""
    response = await handler(request)
    lag = lag_of(request)
    if lag is not None:
        response.headers[LAG_SECONDS_HEADER] = lag.seconds_text()
        if lag.bytes_behind is not None:
            response.headers[LAG_BYTES_HEADER] = str(lag.bytes_behind)
    return response
