"""Prometheus metrics: what an operator watches (``GET /metrics``).

Each application owns its registry, so several apps in one process (tests) do
not share counters. With ``serve --workers N`` every worker writes to
``PROMETHEUS_MULTIPROC_DIR`` and any worker answers for all of them; gauges count
live workers only (``livemax``: the supervisor marks a dead worker's files dead).

Per-tenant counts keep a bounded label set: only the stores ``label_tenants`` names carry their
own ``tenant`` label (``GIFTCARD_METRICS_TENANTS_MAX``, the first created); every other store's
requests count under ``tenant="other"``.
"""

from __future__ import annotations

import os
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from hub.http.auth import TENANT

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
OTHER_TENANTS = "other"  # the label of every store without one of its own
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._tenants_labelled: frozenset[str] = frozenset()
        self._tenant_children: dict[tuple[str, int], Counter] = {}  # (tenant, status // 100)
        r = self.registry
        self.requests = Counter(
            "giftcard_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "giftcard_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.provider_calls = Counter(
            "giftcard_provider_calls",
            "Calls forwarded to external providers",
            ["provider", "operation", "outcome"],
            registry=r,
        )
        self.provider_seconds = Histogram(
            "giftcard_provider_call_seconds",
            "Latency of calls forwarded to external providers",
            ["provider"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.breaker_state = Gauge(
            "giftcard_provider_breaker_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open",
            ["provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.tenant_requests = Counter(
            "giftcard_tenant_requests",
            "HTTP requests answered per store (tenant), by status class",
            ["tenant", "status_class"],
            registry=r,
        )
        self.tenant_limited = Counter(
            "giftcard_tenant_limited",
            "Requests of a store refused 429 by its limits, by the limit",
            ["tenant", "limit"],
            registry=r,
        )
        self.append_seconds = Histogram(
            "giftcard_event_append_seconds", "Event store append latency", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.projection_lag_events = Gauge(
            "giftcard_projection_lag_events",
            "Events not yet applied by a projection",
            ["projection"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.projection_source_lag_events = Gauge(
            "giftcard_projection_source_lag_events",
            "Events of one source (a lane of one server, a shard on Citus) not yet applied by a projection",
            ["projection", "source"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.projection_lag_seconds = Gauge(
            "giftcard_projection_lag_seconds",
            "Age of the oldest event a projection has not applied",
            ["projection"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        # labels() takes a lock and builds a tuple on every call. The children kept here are the
        # ones the registry keeps anyway (aiohttp's parser answers 400 to an unknown method).
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(method, route, str(status)),
                self.request_seconds.labels(method, route),
            )
        count, latency = children
        count.inc()
        latency.observe(seconds)

    def label_tenants(self, tenants: list[str]) -> None:
        """The stores that carry their own ``tenant`` label from now on; the rest count as "other"."""
        labelled = frozenset(tenants)
        if labelled != self._tenants_labelled:
            self._tenants_labelled = labelled
            self._tenant_children = {}

    @property
    def tenants_labelled(self) -> frozenset[str]:
        return self._tenants_labelled

    def tenant_label(self, tenant: str) -> str:
        return tenant if tenant in self._tenants_labelled else OTHER_TENANTS

    def observe_tenant_request(self, tenant: str, status: int) -> None:
        key = (tenant, status // 100)
        count = self._tenant_children.get(key)
        if count is None:
            status_class = STATUS_CLASSES[key[1] - 1] if 1 <= key[1] <= 5 else "5xx"
            count = self._tenant_children[key] = self.tenant_requests.labels(self.tenant_label(tenant), status_class)
        count.inc()

    def observe_tenant_limited(self, tenant: str, limit: str) -> None:
        self.tenant_limited.labels(self.tenant_label(tenant), limit).inc()

    def observe_append(self, seconds: float) -> None:
        self.append_seconds.observe(seconds)

    def observe_provider_call(self, provider: str, operation: str, outcome: str, seconds: float, breaker: str) -> None:
        self.provider_calls.labels(provider, operation, outcome).inc()
        self.provider_seconds.labels(provider).observe(seconds)
        self.breaker_state.labels(provider).set(BREAKER_STATES[breaker])

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def make_metrics_middleware(metrics: Metrics):
    @web.middleware
    async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            route = request.match_info.route.resource
            label = route.canonical if route is not None else "unmatched"
            metrics.observe_request(request.method, label, status, time.perf_counter() - started)
            tenant = request.get(TENANT)  # set by the auth middleware once a key is accepted
            if tenant is not None:
                metrics.observe_tenant_request(tenant, status)

    return metrics_middleware


def metrics_handler(metrics: Metrics):
    async def handler(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return handler
