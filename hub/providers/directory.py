"""The providers this hub process can route to: the native one, always, and the registered
external ones, re-read from the ``providers`` table so a change made through any process is
seen by every other within ``REFRESH_S``."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from hub.providers.breaker import CircuitBreaker
from hub.providers.external import ExternalProvider, Outbound
from ledger.application.providers import ProviderRegistry, RegisteredProvider
from ledger.postgres.tenancy import current_scope

log = logging.getLogger(__name__)

REFRESH_S = 0.5


class ProviderDirectory:
    def __init__(self, registry: ProviderRegistry, outbound: Outbound) -> None:
        self.registry = registry
        self.outbound = outbound
        self._by_tenant: dict[str, dict[str, RegisteredProvider]] = {}
        self.breakers: dict[tuple[str, str], CircuitBreaker] = {}

    @property
    def registered(self) -> dict[str, RegisteredProvider]:
        """The providers of the store whose request asks (its key's tenant): never another's."""
        return self._by_tenant.get(current_scope(), {})

    async def refresh(self) -> None:
        self._by_tenant = await self.registry.load_all()

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
        breaker = self.breakers.get((current_scope(), provider_id))
        if breaker is None:
            breaker = self.breakers[current_scope(), provider_id] = CircuitBreaker(
                failures_max=self.outbound.settings.provider_breaker_failures_max,
                open_s=self.outbound.settings.provider_breaker_open_s,
            )
        return ExternalProvider(registered, breaker, self.outbound)
