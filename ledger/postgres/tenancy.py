"""Which stores (tenants) a database statement may touch: the boundary PostgreSQL enforces.

Row-level security (migration 0016) shows a statement only the rows whose ``tenant_id`` is in
the setting ``giftcard.tenant``. The service keeps that setting in step with ``tenant_scope``, a
context variable: a request runs in its key's tenant, a group commit in the list of its Debits'
tenants, the operator's work (background loops, command-line tools) in ``ALL_TENANTS``. Every
connection the service's pools hand out carries the scope of the task that acquired it
(``ScopedConnection``); with no scope at all it carries the empty scope, which sees nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterable, Iterator

import asyncpg

DEFAULT_TENANT = "default"
ALL_TENANTS = "*"
NO_TENANT = ""
# A VTEX account name: what names a tenant everywhere (key, setting, URL).
ACCOUNT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

_scope: contextvars.ContextVar[str] = contextvars.ContextVar("tenant_scope", default=NO_TENANT)


def is_account(name: str) -> bool:
    return ACCOUNT.fullmatch(name) is not None


class UnknownTenant(LookupError):
    """An operator named a store this database does not hold."""


async def require_tenant(pool: asyncpg.Pool, account: str) -> None:
    """Raises ``UnknownTenant`` unless ``account`` is a store here (a misspelt name must not act on nothing, silently)."""
    if not await pool.fetchval("select exists (select 1 from tenants where account = $1)", account):
        raise UnknownTenant(f"no store (tenant) {account!r} in this database: `giftcard keys list` shows every key's")


def current_scope() -> str:
    return _scope.get()


@contextlib.contextmanager
def tenant_scope(scope: str) -> Iterator[None]:
    """Statements on connections acquired inside run for ``scope``: one account, several joined
    by commas (``scope_of``), or ALL_TENANTS."""
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


def scope_of(tenants: Iterable[str]) -> str:
    """The scope of a statement that writes rows of all these tenants, each row naming its own
    (a row written in the operator's scope names ALL_TENANTS, and is the default tenant's)."""
    tenants = set(tenants)
    return ALL_TENANTS if ALL_TENANTS in tenants else ",".join(sorted(tenants))


class ScopedConnection(asyncpg.Connection):
    """A pooled connection that remembers the scope its session holds, so that acquiring it again
    for the same scope (the usual case: one store, or one store's burst) costs no statement."""

    __slots__ = ("_scope_held",)

    async def enter_scope(self, scope: str) -> None:
        if getattr(self, "_scope_held", None) != scope:
            # Session-level on purpose: it stays for the next acquire, and is changed before any
            # statement of another scope (this runs on every acquire).
            await self.execute("select set_config('giftcard.tenant', $1, false)", scope)
            self._scope_held = scope

    def forget_scope(self) -> None:
        """After a reset (RESET ALL) the session holds no scope any more."""
        self._scope_held = None


async def enter_current_scope(connection: asyncpg.pool.PoolConnectionProxy) -> None:
    """The pools' ``setup``: the acquiring task's scope, on the connection it gets."""
    await connection.enter_scope(current_scope())


async def reset_fully(connection: ScopedConnection) -> None:
    """asyncpg's own release reset (it also drops the scope), for pools whose users leave session state."""
    await connection.reset()
    connection.forget_scope()


async def isolation_gap(pool: asyncpg.Pool) -> str | None:
    """Why row-level security does not keep the tenants apart for this pool's role (a superuser or
    BYPASSRLS role; the events on Citus workers), or None when it does. The service's statements do
    not name their tenant: without it, a scope narrows nothing."""
    role, bypasses, events_secured = await pool.fetchrow(
        """
        select current_user, rolsuper or rolbypassrls,
               (select relrowsecurity from pg_class where oid = 'events'::regclass)
        from pg_roles where rolname = current_user
        """
    )
    if bypasses:
        return f"the database role {role} bypasses it"
    if not events_secured:
        return "the events are on Citus workers"
    return None


async def known_tenants(pool: asyncpg.Pool) -> list[str]:
    """Every tenant not deleted, by account (the tenants table is the operator's: no row-level security)."""
    rows = await pool.fetch("select account from tenants where deleted_at is null order by account")
    return [row["account"] for row in rows]
