"""Noisy neighbours: each store's requests per second and requests in flight, enforced.

A tenant's limits are ``tenants.max_rps`` and ``tenants.max_concurrent`` (null: none of its own,
then ``GIFTCARD_TENANT_MAX_RPS`` / ``GIFTCARD_TENANT_MAX_CONCURRENT`` when set). They are read with
the keys, every ``auth.KEY_REFRESH_S``. Requests per second is a token bucket (burst ``max_rps``,
refilled at ``max_rps`` a second). A request past either limit is answered 429 with the error
``tenant_rate_limited`` or ``tenant_concurrency_limited`` and ``Retry-After`` in whole seconds.

With ``serve --workers N`` each worker enforces its share, ``ceil(limit / N)``: no request pays a
round trip to another process or to the database. The kernel spreads connections over the workers
(``SO_REUSEPORT``), so a store's many connections get about its whole limit; one keep-alive
connection, which lands on one worker, gets that worker's share.

A tenant without a limit costs a dict lookup on the hot path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import asyncpg
from aiohttp import web

from hub.errors import error_response
from hub.http.auth import TENANT
from hub.metrics import Metrics
from ledger.postgres.tenancy import ALL_TENANTS, tenant_scope

RATE_LIMITED = "tenant_rate_limited"
CONCURRENCY_LIMITED = "tenant_concurrency_limited"
CONCURRENCY_RETRY_AFTER_S = 1  # a slot frees when a request ends: nothing to compute it from


class TenantGate:
    """One tenant's limits in this process: a token bucket and a count of requests in flight.

    The object lives as long as the tenant has a limit; a refresh changes its limits in place, so
    the requests in flight keep counting against the same count."""

    __slots__ = ("max_rps", "max_concurrent", "rate_per_s", "tokens", "refilled_at", "concurrent_max", "in_flight")

    def __init__(self, now: float) -> None:
        self.max_rps: int | None = None  # the store's, over every worker (for the messages)
        self.max_concurrent: int | None = None
        self.rate_per_s: int | None = None  # this worker's share: also the bucket's size
        self.concurrent_max: int | None = None
        self.tokens = 0.0
        self.refilled_at = now
        self.in_flight = 0

    def set_limits(self, max_rps: int | None, max_concurrent: int | None, workers: int) -> None:
        rate = share_of(max_rps, workers)
        if rate != self.rate_per_s:
            # A new limit starts with a full bucket, a lowered one keeps no more than it holds now.
            self.tokens = float(rate or 0) if self.rate_per_s is None else min(self.tokens, float(rate or 0))
            self.rate_per_s = rate
        self.concurrent_max = share_of(max_concurrent, workers)
        self.max_rps, self.max_concurrent = max_rps, max_concurrent

    def wait_s(self, now: float) -> float:
        """0, a token taken, when a request may start now; else how long until a token is there."""
        if self.rate_per_s is None:
            return 0.0
        tokens = min(float(self.rate_per_s), self.tokens + (now - self.refilled_at) * self.rate_per_s)
        self.refilled_at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate_per_s

    def is_full(self) -> bool:
        return self.concurrent_max is not None and self.in_flight >= self.concurrent_max


def share_of(limit: int | None, workers: int) -> int | None:
    """A worker's share of a deployment-wide limit, rounded up: never 0, never below the limit in all."""
    return None if limit is None else math.ceil(limit / workers)


class TenantLimits:
    """The limits of every tenant that has one, as this process enforces them."""

    name = "tenant limits"  # in auth.keep_refreshed's warning

    def __init__(
        self,
        metrics: Metrics,
        *,
        workers: int = 1,
        default_max_rps: int | None = None,
        default_max_concurrent: int | None = None,
        metrics_tenants_max: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.workers = workers
        self.default_max_rps = default_max_rps
        self.default_max_concurrent = default_max_concurrent
        self.metrics_tenants_max = metrics_tenants_max
        self.clock = clock
        self.gates: dict[str, TenantGate] = {}

    async def refresh(self, pool: asyncpg.Pool) -> None:
        with tenant_scope(ALL_TENANTS):  # the tenants table is the operator's: no row-level security
            rows = await pool.fetch(
                "select account, max_rps, max_concurrent from tenants where deleted_at is null "
                "order by created_at, account"
            )
        self.apply([(row["account"], row["max_rps"], row["max_concurrent"]) for row in rows])

    def apply(self, tenants: list[tuple[str, int | None, int | None]]) -> None:
        """``tenants``: (account, max_rps, max_concurrent) in the order they were created."""
        gates: dict[str, TenantGate] = {}
        for account, max_rps, max_concurrent in tenants:
            max_rps = max_rps or self.default_max_rps
            max_concurrent = max_concurrent or self.default_max_concurrent
            if max_rps is None and max_concurrent is None:
                continue
            gate = self.gates.get(account) or TenantGate(self.clock())
            gate.set_limits(max_rps, max_concurrent, self.workers)
            gates[account] = gate
        self.gates = gates
        # The first stores created carry their own label: the same ones in every worker and after a restart.
        self.metrics.label_tenants([account for account, _, _ in tenants[: self.metrics_tenants_max]])

    def refusal(self, tenant: str, gate: TenantGate) -> web.Response | None:
        """The 429 for a request of ``tenant`` that may not start now, or None (its token taken)."""
        if gate.is_full():
            self.metrics.observe_tenant_limited(tenant, CONCURRENCY_LIMITED)
            return too_many(
                CONCURRENCY_LIMITED,
                f"this store already has {gate.in_flight} requests in flight, its limit "
                f"(max_concurrent {gate.max_concurrent}, {gate.concurrent_max} per worker)",
                CONCURRENCY_RETRY_AFTER_S,
            )
        wait_s = gate.wait_s(self.clock())
        if wait_s > 0:
            self.metrics.observe_tenant_limited(tenant, RATE_LIMITED)
            return too_many(
                RATE_LIMITED,
                f"this store sent more requests than its limit allows (max_rps {gate.max_rps}, "
                f"{gate.rate_per_s} per worker)",
                max(1, math.ceil(wait_s)),
            )
        return None


def too_many(code: str, message: str, retry_after_s: int) -> web.Response:
    response = error_response(429, code, message)
    response.headers["Retry-After"] = str(retry_after_s)
    return response


def make_tenant_limits_middleware(limits: TenantLimits):
    """Inside the auth middleware, which has named the request's tenant."""

    @web.middleware
    async def tenant_limits_middleware(request: web.Request, handler) -> web.StreamResponse:
        tenant = request.get(TENANT)
        gate = limits.gates.get(tenant)  # type: ignore[arg-type]
        if gate is None:  # no limit (nearly every store), or no tenant (health, metrics)
            return await handler(request)
        refused = limits.refusal(tenant, gate)
        if refused is not None:
            return refused
        gate.in_flight += 1
        try:
            return await handler(request)
        finally:
            gate.in_flight -= 1

    return tenant_limits_middleware
