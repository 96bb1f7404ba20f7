"""Operating the stores (tenants) of a deployment: create, limits, suspend, resume, remove.

Every act is a row of ``tenant_log`` (migration 0017) written in the transaction that does it,
naming who did it (the operating-system user of ``giftcard tenants``). A store's lifecycle:
created (with its first keys), active; suspended (every request answered 403, its data kept, a
``delete_after`` set by the retention); then either resumed, or deleted once ``delete_after`` has
passed: every row of it removed from every table of tenant data (``TENANT_TABLES``), its
``tenants`` row kept with ``deleted_at`` set, so the account and its log outlive it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from ledger.postgres.distribution import is_distributed
from ledger.postgres.rows import from_row
from ledger.postgres.tenancy import tenant_scope

# Every table of a store's data (migration 0016's list), children before the tables they refer to:
# the order a removal deletes in. A test holds it equal to the tables that have a tenant_id column.
TENANT_TABLES = (
    "events",
    "snapshots",
    "card_lookup",
    "api_keys",
    "providers",
    "lookup_failures",
    "webhook_dead_letters",
    "webhook_subscriptions",
    "verify_runs",
    "personal_data_keys",
    "read_card_balance_transactions",
    "read_card_balances",
    "read_transaction_operations",
    "read_transactions",
    "read_history_cards",
    "read_daily_totals_cards",
    "read_daily_totals_transactions",
    "read_daily_totals_forwarded_requests",
    "read_daily_totals",
)

CREATED, LIMITS_SET, SUSPENDED, RESUMED, EXPORTED, DELETED = (
    "created",
    "limits_set",
    "suspended",
    "resumed",
    "exported",
    "deleted",
)
ACTIVE = "active"


class TenantRefused(Exception):
    """An act the tenant's state does not allow; the message says why (and when it would be)."""


class UnknownTenant(TenantRefused):
    pass


class Tenant(msgspec.Struct, frozen=True):
    account: str
    created_at: datetime
    max_rps: int | None
    max_concurrent: int | None
    suspended_at: datetime | None
    delete_after: datetime | None
    deleted_at: datetime | None
    cards: int = 0

    @property
    def state(self) -> str:
        if self.deleted_at is not None:
            return DELETED
        return SUSPENDED if self.suspended_at is not None else ACTIVE


class Limits(msgspec.Struct, frozen=True):
    """What ``tenants set`` changes; a field left UNSET is kept, None removes the limit."""

    max_rps: int | None | msgspec.UnsetType = msgspec.UNSET
    max_concurrent: int | None | msgspec.UnsetType = msgspec.UNSET

    def given(self) -> dict[str, int | None]:
        return {name: value for name, value in msgspec.structs.asdict(self).items() if value is not msgspec.UNSET}


_COLUMNS = "t.account, t.created_at, t.max_rps, t.max_concurrent, t.suspended_at, t.delete_after, t.deleted_at"
# How many cards each tenant holds: one lookup row per card.
_LIST = f"""
with cards as (select tenant_id, count(*) as cards from card_lookup group by tenant_id)
select {_COLUMNS}, coalesce(c.cards, 0) as cards
from tenants t left join cards c on c.tenant_id = t.account
order by t.account
"""


async def log_act(
    connection: asyncpg.Connection, account: str, act: str, actor: str, detail: dict[str, Any] | None = None
) -> None:
    await connection.execute(
        "insert into tenant_log (account, act, actor, detail) values ($1, $2, $3, $4::jsonb)",
        account,
        act,
        actor,
        msgspec.json.encode(detail or {}).decode(),
    )


async def record_act(pool: asyncpg.Pool, account: str, act: str, actor: str, detail: dict[str, Any]) -> None:
    """An act logged on its own: an export reads in a read-only transaction, which cannot write the log."""
    async with pool.acquire() as connection:
        await log_act(connection, account, act, actor, detail)


async def create_tenant(connection: asyncpg.Connection, account: str, limits: Limits, actor: str) -> None:
    """Inside the caller's transaction (which then makes the first keys); TenantRefused if it exists."""
    given = limits.given()
    inserted = await connection.fetchval(
        "insert into tenants (account, max_rps, max_concurrent) values ($1, $2, $3) on conflict do nothing returning 1",
        account,
        given.get("max_rps"),
        given.get("max_concurrent"),
    )
    if inserted is None:
        existing = await _tenant(connection, account)
        _refuse_if_deleted(existing)
        raise TenantRefused(f"tenant {account!r} already exists (created {existing.created_at:%Y-%m-%d %H:%M:%S %Z})")
    await log_act(connection, account, CREATED, actor, given)


async def list_tenants(pool: asyncpg.Pool) -> list[Tenant]:
    """Every tenant, deleted ones too, with how many cards each holds (in the operator's scope)."""
    rows = await pool.fetch(_LIST)
    return [from_row(Tenant, row) for row in rows]


async def get_tenant(pool: asyncpg.Pool, account: str) -> Tenant:
    async with pool.acquire() as connection:
        return await _tenant(connection, account)


async def set_limits(pool: asyncpg.Pool, account: str, limits: Limits, actor: str) -> Tenant:
    given = limits.given()
    async with pool.acquire() as connection, connection.transaction():
        tenant = await _tenant(connection, account, for_update=True)
        _refuse_if_deleted(tenant)
        assignments = ", ".join(f"{name} = ${n}" for n, name in enumerate(given, start=2))
        await connection.execute(f"update tenants set {assignments} where account = $1", account, *given.values())
        await log_act(connection, account, LIMITS_SET, actor, given)
        return await _tenant(connection, account)


async def suspend(pool: asyncpg.Pool, account: str, retention: timedelta, actor: str) -> Tenant:
    """Suspends (again: a new retention from now) a tenant that is not deleted."""
    async with pool.acquire() as connection, connection.transaction():
        _refuse_if_deleted(await _tenant(connection, account, for_update=True))
        await connection.execute(
            """
            update tenants set suspended_at = coalesce(suspended_at, clock_timestamp()),
                               delete_after = clock_timestamp() + $2::interval
            where account = $1
            """,
            account,
            retention,
        )
        tenant = await _tenant(connection, account)
        await log_act(
            connection,
            account,
            SUSPENDED,
            actor,
            {"retention_days": retention.days, "delete_after": tenant.delete_after},
        )
        return tenant


async def resume(pool: asyncpg.Pool, account: str, actor: str) -> Tenant:
    async with pool.acquire() as connection, connection.transaction():
        tenant = await _tenant(connection, account, for_update=True)
        _refuse_if_deleted(tenant)
        if tenant.suspended_at is None:
            raise TenantRefused(f"tenant {account!r} is not suspended")
        await connection.execute(
            "update tenants set suspended_at = null, delete_after = null where account = $1", account
        )
        await log_act(connection, account, RESUMED, actor)
        return await _tenant(connection, account)


async def delete_tenant(pool: asyncpg.Pool, account: str, actor: str) -> dict[str, int]:
    """Removes every row of a suspended tenant whose retention has passed, in one transaction; returns
    the rows removed per table. The events' immutability trigger lets these deletes through only
    because this session names the tenant in giftcard.removing_tenant (migration 0018)."""
    if await is_distributed(pool):
        raise TenantRefused(
            "removing a tenant is not supported on Citus yet: the commit order's floors (migration 0018) "
            "are kept on one server only"
        )
    with tenant_scope(account):  # row-level security holds the deletes to this tenant too
        async with pool.acquire() as connection, connection.transaction():
            tenant = await _tenant(connection, account, for_update=True)
            await _refuse_unless_removable(connection, tenant)
            await connection.execute("select set_config('giftcard.removing_tenant', $1, true)", account)
            await _raise_seq_floors(connection, account)
            removed = {}
            for table in TENANT_TABLES:
                status = await connection.execute(f"delete from {table} where tenant_id = $1", account)
                removed[table] = int(status.rsplit(" ", 1)[1])
            await connection.execute("update tenants set deleted_at = clock_timestamp() where account = $1", account)
            await log_act(connection, account, DELETED, actor, {"rows_removed": removed})
    return removed


async def _raise_seq_floors(connection: asyncpg.Connection, account: str) -> None:
    """Keeps each source's last seq where it was, whatever of it the removal takes (migration 0018)."""
    await connection.execute(
        """
        insert into event_seq_floors (source, seq)
        select source, max(seq) from events where tenant_id = $1 group by source
        on conflict (source) do update set seq = greatest(event_seq_floors.seq, excluded.seq)
        """,
        account,
    )


async def _refuse_unless_removable(connection: asyncpg.Connection, tenant: Tenant) -> None:
    _refuse_if_deleted(tenant)
    if tenant.suspended_at is None or tenant.delete_after is None:
        raise TenantRefused(
            f"tenant {tenant.account!r} is not suspended: suspend it first (giftcard tenants suspend), "
            "and delete it once its retention has passed"
        )
    now = await connection.fetchval("select clock_timestamp()")
    if now < tenant.delete_after:
        raise TenantRefused(
            f"tenant {tenant.account!r} is suspended until its retention passes: it may be deleted from "
            f"{tenant.delete_after:%Y-%m-%d %H:%M:%S %Z} on"
        )


def _refuse_if_deleted(tenant: Tenant) -> None:
    if tenant.deleted_at is not None:
        raise TenantRefused(f"tenant {tenant.account!r} was deleted on {tenant.deleted_at:%Y-%m-%d %H:%M:%S %Z}")


async def _tenant(connection: asyncpg.Connection, account: str, *, for_update: bool = False) -> Tenant:
    lock = " for update" if for_update else ""
    row = await connection.fetchrow(f"select {_COLUMNS} from tenants t where t.account = $1{lock}", account)
    if row is None:
        raise UnknownTenant(f"no tenant {account!r} (giftcard tenants list shows them)")
    return from_row(Tenant, row, cards=0)
