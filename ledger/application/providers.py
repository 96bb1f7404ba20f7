"""The provider registry's write side: every change is an event on the provider's stream,
and the ``providers`` table the hub reads is updated in the same transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from ledger.domain.errors import InvalidRequest, NotFound
from ledger.domain.provider import NativeProviderIsBuiltIn, ProviderSpec, check_provider_id, check_registration
from ledger.eventstore.codec import canonical_json
from ledger.eventstore.store import GENESIS_HASH, EventStore, NewEvent
from ledger.postgres.credentials_cipher import CredentialsCipher
from ledger.postgres.rows import from_row
from ledger.postgres.tenancy import ALL_TENANTS, DEFAULT_TENANT, current_scope, tenant_scope

REGISTERED = "ProviderRegistered"
REMOVED = "ProviderRemoved"


class ProviderNotFound(NotFound):
    code = "provider_not_found"


class Credentials(msgspec.Struct, frozen=True):
    app_key: str
    app_token: str

    def __repr__(self) -> str:  # never let a token reach a log line through a repr
        return f"Credentials(app_key={self.app_key!r}, app_token='***')"


@dataclass(frozen=True)
class RegisteredProvider:
    spec: ProviderSpec
    credentials: Credentials | None
    version: int


_credentials_codec = (msgspec.json.Encoder(), msgspec.json.Decoder(Credentials))


def stream_of(provider_id: str, tenant: str, default_tenant: str) -> str:
    """A provider's stream; two stores may register the same provider id, so the tenant names it
    too ('@' is in neither a provider id nor an account). The default tenant's keep the names they
    had before there were tenants, so an upgraded registry's history goes on in the same streams."""
    return f"provider-{provider_id}" if tenant == default_tenant else f"provider-{provider_id}@{tenant}"


class ProviderRegistry:
    """Each store's providers: every statement runs in the request's tenant (row-level security)."""

    def __init__(
        self, store: EventStore, cipher: CredentialsCipher, native_id: str, default_tenant: str = DEFAULT_TENANT
    ) -> None:
        self.store = store
        self.cipher = cipher
        self.native_id = native_id
        self.default_tenant = default_tenant

    async def put(
        self, spec: ProviderSpec, credentials: Credentials | None, *, metadata: dict[str, Any] | None = None
    ) -> RegisteredProvider:
        check_registration(spec, self.native_id)
        if credentials is None:
            raise InvalidRequest("appKey and appToken are required for an external provider")
        sealed = self.cipher.encrypt(_credentials_codec[0].encode(credentials), context=spec.id)
        data = {
            "providerId": spec.id,
            "serviceUrl": spec.service_url,
            "oauthProvider": spec.oauth_provider,
            "caption": spec.caption,
            "preAuthEnabled": spec.pre_auth_enabled,
            "cancelEnabled": spec.cancel_enabled,
            "credentials": sealed,
        }
        async with self.store.pool.acquire() as connection, connection.transaction():
            version = await self._append(connection, spec.id, REGISTERED, data, metadata)
            await connection.execute(
                """
                insert into providers (id, service_url, oauth_provider, caption, pre_auth_enabled, cancel_enabled,
                                       credentials, version)
                values ($1, $2, $3, $4, $5, $6, $7, $8)
                on conflict (tenant_id, id) do update set
                    service_url = excluded.service_url, oauth_provider = excluded.oauth_provider,
                    caption = excluded.caption, pre_auth_enabled = excluded.pre_auth_enabled,
                    cancel_enabled = excluded.cancel_enabled, credentials = excluded.credentials,
                    version = excluded.version, updated_at = clock_timestamp()
                """,
                spec.id,
                spec.service_url,
                spec.oauth_provider,
                spec.caption,
                spec.pre_auth_enabled,
                spec.cancel_enabled,
                sealed,
                version,
            )
        return RegisteredProvider(spec, credentials, version)

    async def remove(self, provider_id: str, *, metadata: dict[str, Any] | None = None) -> None:
        check_provider_id(provider_id)
        if provider_id == self.native_id:
            raise NativeProviderIsBuiltIn(f"{self.native_id} is the built-in native provider; it cannot be deleted")
        async with self.store.pool.acquire() as connection, connection.transaction():
            deleted = await connection.fetchval("delete from providers where id = $1 returning id", provider_id)
            if deleted is None:
                raise ProviderNotFound(f"gift card provider {provider_id!r} not found")
            await self._append(connection, provider_id, REMOVED, {"providerId": provider_id}, metadata)

    async def load_all(self) -> dict[str, dict[str, RegisteredProvider]]:
        """Every store's providers (tenant -> provider id -> provider), for the hub's directory."""
        with tenant_scope(ALL_TENANTS):
            rows = await self.store.pool.fetch("select * from providers order by tenant_id, id")
        by_tenant: dict[str, dict[str, RegisteredProvider]] = {}
        for row in rows:
            by_tenant.setdefault(row["tenant_id"], {})[row["id"]] = self._from_row(row)
        return by_tenant

    def _from_row(self, row: asyncpg.Record) -> RegisteredProvider:
        spec = from_row(ProviderSpec, row)
        credentials = None
        if row["credentials"] and self.cipher.available:
            credentials = _credentials_codec[1].decode(self.cipher.decrypt(row["credentials"], context=row["id"]))
        return RegisteredProvider(spec, credentials, row["version"])

    async def _append(
        self, connection: asyncpg.Connection, provider_id: str, type_: str, data: dict[str, Any], metadata: Any
    ) -> int:
        stream = stream_of(provider_id, current_scope(), self.default_tenant)
        # An advisory lock (not FOR UPDATE, which needs UPDATE rights on events) serialises
        # changes to one provider across processes.
        await connection.execute("select pg_advisory_xact_lock(hashtext($1))", stream)
        head = await connection.fetchrow(
            "select version, hash from events where stream_id = $1 order by version desc limit 1", stream
        )
        version, previous_hash = (head["version"], head["hash"]) if head else (0, GENESIS_HASH)
        await self.store.append(
            stream,
            version,
            [NewEvent(type_, canonical_json(msgspec.json.encode(data)))],
            previous_hash=previous_hash,
            metadata=metadata,
            connection=connection,
        )
        return version + 1
