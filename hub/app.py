"""The aiohttp application: middlewares, routes, and the resources they share.

Resources (pool, ledger, credentials, background tasks) live in cleanup contexts,
so a test can start the whole service on a loopback port and stop it cleanly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

import aiohttp
import asyncpg
from aiohttp import web

from hub import webhooks
from hub.config import Settings
from hub.errors import error_middleware, error_response
from hub.http import accounts, audit_api, auth, bulk_api, openapi, read_api, read_pool, webhooks_api
from hub.http.hub_api import HubHandlers
from hub.http.native import NativeHandlers, json_response
from hub.http.state import (
    DIRECTORY,
    EGRESS,
    LEDGER,
    METRICS,
    POOL,
    READ_POOL,
    REGISTRY,
    SETTINGS,
    TENANT_LIMITS,
    TENANTS_ISOLATED,
    THROTTLE,
)
from hub.http.tenant_limits import TenantLimits, make_tenant_limits_middleware
from hub.logs import CURRENT_REQUEST_ID, REQUEST_ID
from hub.metrics import Metrics, make_metrics_middleware, metrics_handler
from hub.pages import audit as audit_pages
from hub.pages import rollforward as rollforward_pages
from hub.providers.directory import ProviderDirectory
from hub.providers.egress import EgressPolicy, GuardedResolver
from hub.providers.external import Outbound
from hub.providers.lookup_throttle import LookupThrottle
from hub.providers.native import Surface
from ledger.application.commands import Ledger, utc_now
from ledger.application.hold_expiry import run_hold_expiry
from ledger.application.providers import ProviderRegistry
from ledger.eventstore.store import EventStore
from ledger.postgres.credentials_cipher import CredentialsCipher
from ledger.postgres.database import create_pool
from ledger.postgres.instance_keys import instance_key
from ledger.postgres.migrate import upgrade
from ledger.postgres.personal_data import PersonalData
from ledger.postgres.replication import replication_status
from ledger.postgres.tenancy import ALL_TENANTS, isolation_gap, tenant_scope
from projections import checkpoints, read_models
from projections.runner import ProjectionRunner

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0
# How long a stopping worker waits for the snapshots still to write: a cache, not worth holding a
# stop for while the database is unreachable (each batch would wait for a connection's timeout).
SNAPSHOTS_DRAIN_S = 5.0
REQUEST_ID_CHARS_MAX = 128
PROVIDER_CONNECTIONS_MAX = 256
REPLICA_POOL_SIZE_MAX = 5  # listings, audit pages: few at once, each a short read


@web.middleware
async def request_id_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Carries the caller's correlation id (VTEX sends ``x-vtex-operation-id``) into events and logs."""
    given = request.headers.get("X-Request-Id") or request.headers.get("x-vtex-operation-id") or ""
    request_id = given[:REQUEST_ID_CHARS_MAX] if given.isprintable() and given else new_request_id()
    request[REQUEST_ID] = request_id
    token = CURRENT_REQUEST_ID.set(request_id)
    try:
        response = await handler(request)
    finally:
        CURRENT_REQUEST_ID.reset(token)
    response.headers["X-Request-Id"] = request_id
    return response


_REQUEST_IDS = itertools.count()
_PROCESS_PREFIX = secrets.token_hex(8)  # tells this process's ids from every other's


def new_request_id() -> str:
    """Unique, for correlating log lines; not a secret, so a counter rather than 16 random bytes a request."""
    return f"{_PROCESS_PREFIX}{next(_REQUEST_IDS):016x}"


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the primary answers; says whether its commits are synchronously replicated."""
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            replication = await replication_status(request.app[POOL])
    except Exception as e:  # any failure to reach the database means "not ready", never a 500
        return error_response(503, "not_ready", f"database unreachable: {type(e).__name__}")
    return json_response({"status": "ready", "replication": replication.to_wire()})


async def tenants_isolated(pool: asyncpg.Pool) -> bool:
    """Whether row-level security keeps the tenants apart here. The service's statements do not
    name their tenant, so without it only the default tenant's keys are served: the others' get
    403 (see auth.KeyRing)."""
    gap = await isolation_gap(pool)
    if gap is not None:
        log.warning(
            "row-level security does not keep tenants apart here (%s): only the default tenant is served; "
            "see the README's Many stores",
            gap,
        )
    return gap is None


async def warn_unless_replicated(pool: asyncpg.Pool) -> None:
    reason = (await replication_status(pool)).why_not_synchronous()
    if reason is not None:
        log.warning(
            "the database is not synchronously replicated (%s): a write acknowledged now is lost if the "
            "primary's machine is; see the README's \"High availability\"",
            reason,
        )


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Projection lag is read when scraped, so it is as fresh as the scrape."""
    metrics = request.app[METRICS]
    try:
        # Counts over every store's events, never their contents: the operator's view.
        with tenant_scope(ALL_TENANTS):
            async with asyncio.timeout(READY_TIMEOUT_S):
                statuses = await checkpoints.statuses(request.app[POOL])
        for status in statuses:
            metrics.projection_lag_events.labels(status.name).set(status.lag_events)
            metrics.projection_lag_seconds.labels(status.name).set(status.lag_s)
            for source, lag in status.lag_by_source.items():
                metrics.projection_source_lag_events.labels(status.name, str(source)).set(lag)
    except Exception:  # a database that is down must not take the metrics of the outage down with it
        log.warning("projection lag not refreshed for /metrics", exc_info=True)
    return await metrics_handler(metrics)(request)


def start_background_tasks(
    app: web.Application,
    pool: asyncpg.Pool,
    webhook_pool: asyncpg.Pool | None,
    rings: dict[str, auth.KeyRing],
    limits: TenantLimits,
    states: auth.TenantStates,
    cipher: CredentialsCipher,
) -> list[asyncio.Task]:
    """What a hub process does besides answering requests; each kind may run in every process."""
    settings = app[SETTINGS]
    tasks = [
        asyncio.create_task(auth.keep_refreshed(pool, [*rings.values(), limits, states])),
        asyncio.create_task(app[DIRECTORY].keep_refreshed()),
    ]
    if settings.hold_ttl_s > 0:
        hold_ttl = timedelta(seconds=settings.hold_ttl_s)
        tasks.append(
            asyncio.create_task(
                run_hold_expiry(
                    pool, app[LEDGER], hold_ttl, settings.native_provider_id, settings.hold_sweep_interval_s
                )
            )
        )
    if webhook_pool is not None:  # GIFTCARD_RUN_WEBHOOKS; deliverers in other processes share the work
        tasks.append(
            asyncio.create_task(webhooks.run_deliveries(webhook_pool, settings, asyncio.Event(), cipher=cipher))
        )
    if settings.run_projections:  # read models; runners in other processes share the work safely
        runner = ProjectionRunner(pool, read_models(settings.native_provider_id))
        tasks.append(asyncio.create_task(runner.run_forever()))
    return tasks


def create_app(
    settings: Settings,
    database_url: str,
    *,
    clock: Callable[[], datetime] = utc_now,
    cipher: CredentialsCipher | None = None,
    announce: Callable[[str, tuple[str, str]], None] = auth.announce,
) -> web.Application:
    rings = {
        auth.HUB: auth.KeyRing(auth.HUB, settings.default_tenant, _pair(settings.app_key, settings.app_token)),
        auth.PROVIDER: auth.KeyRing(
            auth.PROVIDER, settings.default_tenant, _pair(settings.provider_app_key, settings.provider_app_token)
        ),
    }
    states = auth.TenantStates()
    metrics = Metrics()
    limits = TenantLimits(
        metrics,
        workers=settings.workers,
        default_max_rps=settings.tenant_max_rps,
        default_max_concurrent=settings.tenant_max_concurrent,
        metrics_tenants_max=settings.metrics_tenants_max,
    )
    app = web.Application(
        client_max_size=settings.body_bytes_max,
        middlewares=[
            make_metrics_middleware(metrics),
            request_id_middleware,
            # Only with a replica: no request pays for a layer that would never add a header.
            *([read_pool.replica_lag_headers] if settings.replica_url else []),
            error_middleware,
            auth.make_auth_middleware(rings, states),
            accounts.make_account_middleware(),
            make_tenant_limits_middleware(limits),
        ],
    )
    app[METRICS] = metrics
    app[TENANT_LIMITS] = limits
    app[SETTINGS] = settings
    cipher = cipher or CredentialsCipher(settings.secret_key)
    app[EGRESS] = EgressPolicy(settings.provider_allowlist)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # Request handlers leave no session state on a connection: a cheap release reset.
        pool = await create_pool(
            database_url,
            size_max=settings.pool_size_max,
            session_state=False,
            statement_timeout_s=settings.statement_timeout_s,
        )
        webhook_pool = await webhooks.create_delivery_pool(database_url) if settings.run_webhooks else None
        # No connection opened at start (size_min 0): a replica that is down fails only what reads it.
        replica_pool = (
            await create_pool(settings.replica_url, size_min=0, size_max=REPLICA_POOL_SIZE_MAX, session_state=False)
            if settings.replica_url
            else None
        )
        try:
            async with pool.acquire() as connection:
                await upgrade(connection, default_tenant=settings.default_tenant)
            await warn_unless_replicated(pool)
            isolated = await tenants_isolated(pool)
            app[TENANTS_ISOLATED] = isolated
            app[POOL] = pool
            app[READ_POOL] = replica_pool if replica_pool is not None else pool
            store = EventStore(pool, observe_append=metrics.observe_append)
            app[THROTTLE] = LookupThrottle(
                pool,
                await instance_key(pool, "lookup-throttle", settings.secret_key),
                shopper_failures_max=settings.lookup_client_failures_max,
                caller_failures_slow_after=settings.lookup_caller_failures_slow_after,
                failure_delay_s=settings.lookup_failure_delay_s,
                window_s=settings.lookup_window_s,
            )
            app[LEDGER] = Ledger(
                store,
                await instance_key(pool, "redemption-codes", settings.secret_key),
                clock=clock,
                shared_cards=settings.workers > 1,  # the other workers debit the same cards
                deadline_s=settings.statement_timeout_s,  # a request's, not only each statement's
                personal_data=PersonalData(pool, settings.secret_key, settings.privacy_poll_s),
            )
            for ring in rings.values():
                ring.other_tenants_served = isolated
                with tenant_scope(settings.default_tenant):  # a first start's pairs are the default tenant's
                    pair = await auth.bootstrap_pair(pool, ring)
                if pair is not None:
                    announce(ring.audience, pair)
                await ring.refresh(pool)
            await limits.refresh(pool)
            await states.refresh(pool)
            app[REGISTRY] = ProviderRegistry(store, cipher, settings.native_provider_id, settings.default_tenant)
            connector = aiohttp.TCPConnector(
                limit=PROVIDER_CONNECTIONS_MAX, resolver=GuardedResolver(app[EGRESS]), use_dns_cache=False
            )
            async with aiohttp.ClientSession(connector=connector) as session:
                outbound = Outbound(session, app[EGRESS], settings, metrics, store)
                app[DIRECTORY] = ProviderDirectory(app[REGISTRY], outbound)
                with tenant_scope(ALL_TENANTS):  # the operator's work, for every store (tasks copy the scope)
                    await app[DIRECTORY].refresh()
                    background = start_background_tasks(app, pool, webhook_pool, rings, limits, states, cipher)
                yield
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                try:  # before the pool closes under its writer
                    await asyncio.wait_for(app[LEDGER].snapshots_saved(), SNAPSHOTS_DRAIN_S)
                except TimeoutError:
                    log.warning(
                        "snapshots still to write after %.0f s; the cards load from their events", SNAPSHOTS_DRAIN_S
                    )
        finally:
            if replica_pool is not None:
                await replica_pool.close()
            if webhook_pool is not None:
                await webhook_pool.close()
            await pool.close()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    vtex_surfaces = [
        *NativeHandlers(Surface.PROTOCOL, "/native").routes(),
        *NativeHandlers(Surface.GIFTCARD_API, "/api").routes(),
        *HubHandlers().routes(),
    ]
    app.router.add_routes(vtex_surfaces)
    app.router.add_routes(accounts.account_routes(vtex_surfaces))  # where a store's links point
    openapi.add_routes(app)
    app.router.add_routes(read_api.routes())
    app.router.add_routes(webhooks_api.routes())
    app.router.add_routes(audit_api.routes())
    app.router.add_routes(audit_pages.routes())
    app.router.add_routes(rollforward_pages.routes())
    app.router.add_routes(bulk_api.routes())
    return app


def _pair(key: str | None, token: str | None) -> tuple[str, str] | None:
    return (key, token) if key and token else None
