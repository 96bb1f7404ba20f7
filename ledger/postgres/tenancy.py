"""Which stores (tenants) a database statement may touch: the boundary PostgreSQL enforces.

Row-level security (migration 0016) shows a statement only the rows whose ``tenant_id`` is in
the setting ``giftcard.tenant``. The service keeps that setting in step with ``tenant_scope``, a
context variable: a request runs in its key's tenant, the operator's work (background loops,
command-line tools) and a group commit of several stores' Debits (each row naming its own, see
ledger.eventstore.store's _APPEND_EACH) in ``ALL_TENANTS``. Every
connection the service's pools hand out carries the scope of the task that acquired it
(``ScopedConnection``); with no scope at all it carries the empty scope, which sees nothing.

On Citus the rows of events, snapshots and card_lookup live on the workers, whose sessions never
see the coordinator's setting: Citus carries a ``SET LOCAL`` to them (with
``citus.propagate_set_commands = 'local'``) but nothing set for the session. So
there a statement that names one of those tables runs inside a transaction that sets the scope
with ``SET LOCAL`` (see ``ScopedConnection``), and the functions Citus runs on a worker take the
scope as an argument (ledger.postgres.distribution). A statement that slips through both finds the
workers' setting unset, which is the empty scope: it sees nothing, it never sees too much.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from collections.abc import Iterator

import asyncpg
import asyncpg.transaction

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
    """Statements on connections acquired inside run for ``scope``: one account, or ALL_TENANTS."""
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


# What a scope may hold: an account name, ALL_TENANTS, nothing.
_SCOPE = re.compile(r"[a-z0-9*-]*")
# The session's scope, from a statement's first parameter: see ScopedConnection.fetchrow_entering_scope.
ENTER_SCOPE = "set_config('giftcard.tenant', $1, false) as scope"
_CITUS_INSTALLED = "select exists (select 1 from pg_extension where extname = 'citus')"
# The tables whose rows Citus keeps on the workers (ledger.postgres.distribution's CARD_TABLES and
# REFERENCE_TABLES; a reference table's writes reach every node). As a word: source_events( and
# append_events( carry their scope themselves.
_ON_WORKERS = re.compile(r"\b(events|snapshots|card_lookup)\b")


@functools.lru_cache(maxsize=4096)
def _reaches_workers(query: str) -> bool:
    return _ON_WORKERS.search(query) is not None


def set_local_statement(scope: str) -> str:
    """The scope for the current transaction only, as a plain SET LOCAL: the one form Citus sends
    on to the workers (no parameters in a utility statement: the scope's alphabet needs no quoting).

    Citus sends on a SET LOCAL only while ``citus.propagate_set_commands`` is 'local', and then the
    whole text of the statement's query: so this one turns it on, for this transaction only, in the
    same text (a worker runs both). Not for every session: a SET LOCAL in a query of several
    statements would take the others along (an exported snapshot's id, which no worker knows)."""
    if not _SCOPE.fullmatch(scope):
        raise ValueError(f"{scope!r} is not a tenant scope")
    return f"set local citus.propagate_set_commands = 'local'; set local giftcard.tenant = '{scope}'"


class ScopedConnection(asyncpg.Connection):
    """A pooled connection that remembers the scope its session holds, so that acquiring it again
    for the same scope (the usual case: one store, or one store's burst) costs no statement.

    On a Citus coordinator it also takes the scope to the workers: a transaction it starts sets it
    with SET LOCAL, and a statement outside a transaction that names a table of the workers runs in
    one (BEGIN, SET LOCAL, the statement, COMMIT: three round trips more, on Citus only). Not
    executemany, COPY or cursors: run those in a transaction, as a cursor needs anyway."""

    __slots__ = ("_scope_held", "_on_citus")

    async def enter_scope(self, scope: str) -> None:
        if getattr(self, "_on_citus", None) is None:
            self._on_citus = await self.fetchval(_CITUS_INSTALLED)  # once per connection
        if getattr(self, "_scope_held", None) != scope:
            # Session-level on purpose: it stays for the next acquire, and is changed before any
            # statement of another scope (this runs on every acquire).
            await self.execute(f"select {ENTER_SCOPE}", scope)
            self._scope_held = scope

    async def fetchrow_entering_scope(self, scope: str, query: str, *args: object) -> asyncpg.Record:
        """``query`` with ``scope`` as its $1, which it enters with ENTER_SCOPE (among its columns):
        the scope and a first statement in one round trip, for a connection that moves between
        stores on every use (a webhook slot's). The statements after it run in ``scope``."""
        if not _SCOPE.fullmatch(scope):
            raise ValueError(f"{scope!r} is not a tenant scope")
        self._scope_held = None  # unknown until it answers
        row = await self.fetchrow(query, scope, *args)
        self._scope_held = scope
        return row

    def _scope_held_on_citus(self) -> str:
        """The scope the workers must be given; empty on one server (the session's setting serves)."""
        return (getattr(self, "_scope_held", None) or NO_TENANT) if getattr(self, "_on_citus", False) else NO_TENANT

    def _runs_in_a_scoped_transaction(self, query: str) -> bool:
        """Whether a statement must carry its scope to the workers and no transaction does it yet."""
        if not self._scope_held_on_citus() or self._top_xact is not None or self.is_in_transaction():
            return False
        return _reaches_workers(query)

    async def _execute(self, query, args, limit, timeout, **options):
        if not self._runs_in_a_scoped_transaction(query):
            return await super()._execute(query, args, limit, timeout, **options)
        async with self.transaction():
            return await super()._execute(query, args, limit, timeout, **options)

    async def execute(self, query: str, *args, timeout: float | None = None) -> str:
        if args or not self._runs_in_a_scoped_transaction(query):  # with arguments it goes through _execute
            return await super().execute(query, *args, timeout=timeout)
        async with self.transaction():
            return await super().execute(query, timeout=timeout)

    def transaction(self, *, isolation=None, readonly=False, deferrable=False) -> asyncpg.transaction.Transaction:
        self._check_open()
        return _ScopedTransaction(self, isolation, readonly, deferrable)

    async def scope_transaction(self) -> None:
        """Just after BEGIN: the scope for the workers too (on one server the session's serves)."""
        scope = self._scope_held_on_citus()
        if scope:
            await super().execute(set_local_statement(scope))

    def forget_scope(self) -> None:
        """After a reset (RESET ALL) the session holds no scope any more."""
        self._scope_held = None


class _ScopedTransaction(asyncpg.transaction.Transaction):
    async def start(self) -> None:
        outermost = self._connection._top_xact is None
        await super().start()
        if outermost:
            await self._connection.scope_transaction()


async def enter_current_scope(connection: asyncpg.pool.PoolConnectionProxy) -> None:
    """The pools' ``setup``: the acquiring task's scope, on the connection it gets."""
    await connection.enter_scope(current_scope())


async def reset_fully(connection: ScopedConnection) -> None:
    """asyncpg's own release reset (it also drops the scope), for pools whose users leave session state."""
    await connection.reset()
    connection.forget_scope()


async def isolation_gap(pool: asyncpg.Pool) -> str | None:
    """Why row-level security does not keep the tenants apart for this pool's role (a superuser or
    BYPASSRLS role; an operator who turned it off on the events table), or None when it does. On Citus
    it holds on the workers too (migration 0019, ScopedConnection). The service's statements do
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
        return "it is turned off on the events table"
    return None


async def known_tenants(pool: asyncpg.Pool) -> list[str]:
    """Every tenant not deleted, by account (the tenants table is the operator's: no row-level security)."""
    rows = await pool.fetch("select account from tenants where deleted_at is null order by account")
    return [row["account"] for row in rows]
