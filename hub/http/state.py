"""Typed application state shared by the handlers (aiohttp ``AppKey``s)."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from hub.config import Settings
from hub.http.tenant_limits import TenantLimits
from hub.metrics import Metrics
from hub.providers.directory import ProviderDirectory
from hub.providers.egress import EgressPolicy
from hub.providers.lookup_throttle import LookupThrottle
from ledger.application.commands import Ledger
from ledger.application.providers import ProviderRegistry

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
# What only reads is served from: the replica's pool when GIFTCARD_REPLICA_URL is set, else POOL itself.
READ_POOL = web.AppKey("read_pool", asyncpg.Pool)
LEDGER = web.AppKey("ledger", Ledger)
REGISTRY = web.AppKey("registry", ProviderRegistry)
DIRECTORY = web.AppKey("directory", ProviderDirectory)
EGRESS = web.AppKey("egress", EgressPolicy)
THROTTLE = web.AppKey("throttle", LookupThrottle)
METRICS = web.AppKey("metrics", Metrics)
TENANT_LIMITS = web.AppKey("tenant_limits", TenantLimits)
# Whether row-level security keeps the tenants apart here (hub.app.tenants_isolated)
TENANTS_ISOLATED = web.AppKey("tenants_isolated", bool)
