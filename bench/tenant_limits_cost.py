"""What the per-tenant limits add to every request's CPU, in process, without a database.

A store without a limit pays the limits middleware (a dict lookup) and its per-tenant count in
``/metrics``; a limited one also its token bucket. Each figure is the best of ``ROUNDS`` loops of
``CALLS`` awaited calls on uvloop, in nanoseconds per request.

    python -m bench.tenant_limits_cost
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import uvloop
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from hub.http.auth import TENANT
from hub.http.tenant_limits import TenantLimits, make_tenant_limits_middleware
from hub.metrics import Metrics

CALLS = 300_000
ROUNDS = 5
STORES = 100
RATE_NEVER_REACHED = 1_000_000  # a limit that is kept but never refuses: the bucket's cost alone


async def best_ns(call: Callable[[], Awaitable[object] | None]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            awaited = call()
            if awaited is not None:
                await awaited
        best = min(best, (time.perf_counter() - started) / CALLS)
    return best * 1e9


async def main() -> None:
    metrics = Metrics()
    limits = TenantLimits(metrics, metrics_tenants_max=STORES)
    limits.apply([(f"store-{n}", None, None) for n in range(STORES)] + [("limited", RATE_NEVER_REACHED, None)])
    middleware = make_tenant_limits_middleware(limits)
    request = make_mocked_request("POST", "/native/giftcards/card/transactions")
    answer = web.Response()

    async def handler(request: web.Request) -> web.StreamResponse:
        return answer

    request[TENANT] = "store-5"
    alone = await best_ns(lambda: handler(request))
    unlimited = await best_ns(lambda: middleware(request, handler))
    counted = await best_ns(lambda: metrics.observe_tenant_request("store-5", 200))
    request[TENANT] = "limited"
    limited = await best_ns(lambda: middleware(request, handler))
    print(f"a handler awaited alone:                       {alone:6.0f} ns")
    print(f"through the limits middleware, no limit:       {unlimited:6.0f} ns (+{unlimited - alone:.0f})")
    print(f"through the limits middleware, a limited store: {limited:5.0f} ns (+{limited - alone:.0f})")
    print(f"the per-tenant count in /metrics:              {counted:6.0f} ns")


if __name__ == "__main__":
    uvloop.run(main())
