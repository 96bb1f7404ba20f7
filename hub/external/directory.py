"""The providers this hub process can route to: the native one, always, and the registered
external ones, re-read from the ``providers`` table so a change made through any process is
seen by every other within ``REFRESH_S``."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import asyncpg

from hub.config import Settings
from hub.external.breaker import CircuitBreaker
from hub.external.client import ExternalProvider
from hub.external.egress import EgressPolicy
from hub.metrics import Metrics
from ledger.providers import ProviderRegistry, RegisteredProvider
from ledger.store import EventStore

log = logging.getLogger(__name__)

REFRESH_S = 0.5


class ProviderDirectory:
    def __init__(
        self,
        registry: ProviderRegistry,
        session: aiohttp.ClientSession,
        store: EventStore,
        settings: Settings,
        egress: EgressPolicy,
        metrics: Metrics,
    ) -> None:
        self.egress = egress
        self.metrics = metrics
        self.registry = registry
        self.session = session
        self.store = store
        self.settings = settings
        self.registered: dict[str, RegisteredProvider] = {}
        self.breakers: dict[str, CircuitBreaker] = {}

    async def refresh(self) -> None:
        self.registered = await self.registry.load_all()

    async def keep_refreshed(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("could not refresh the provider registry; routing with the previous one")

    def external(self, provider_id: str) -> ExternalProvider | None:
        registered = self.registered.get(provider_id)
        if registered is None:
            return None
        breaker = self.breakers.get(provider_id)
        if breaker is None:
            breaker = self.breakers[provider_id] = CircuitBreaker(
                failures_max=self.settings.provider_breaker_failures_max, open_s=self.settings.provider_breaker_open_s
            )
        return ExternalProvider(registered, self.session, breaker, self.store, self.settings, self.egress, self.metrics)
