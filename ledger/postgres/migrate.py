"""Schema migrations: numbered ``.sql`` files in ``ledger/postgres/migrations``, applied in order, once.

Each file runs in its own transaction and is recorded in ``schema_migrations``; an
advisory lock lets several processes start at once without racing.
"""

from __future__ import annotations

import importlib.resources
import re

import asyncpg

from ledger.postgres.distribution import distribute, distribution_pending, grant_on_workers
from ledger.postgres.tenancy import DEFAULT_TENANT

_LOCK_KEY = 0x6769667463617264  # "giftcard"
# A migration may rewrite a large table: it is not held to the few seconds a request's statement gets.
MIGRATION_TIMEOUT_S = 3600.0
_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped with the package, in order."""
    found = []
    for entry in importlib.resources.files("ledger.postgres.migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text()))
    return sorted(found)


async def pending(connection: asyncpg.Connection) -> list[int]:
    """Versions shipped but not applied; reading this needs no DDL rights."""
    if await connection.fetchval("select to_regclass('schema_migrations')") is None:
        return [version for version, _, _ in migration_files()]
    done = {r["version"] for r in await connection.fetch("select version from schema_migrations")}
    return [version for version, _, _ in migration_files() if version not in done]


async def upgrade(connection: asyncpg.Connection, *, default_tenant: str = DEFAULT_TENANT) -> list[str]:
    """Applies every migration not yet recorded; returns the names applied (empty when current).

    A current schema is left alone without taking the lock or running any DDL, so the
    service can run as a role that may not change the schema (see grant_service_role).
    ``default_tenant`` is the tenant a single-store database's rows become (migration 0016); on a
    Citus coordinator the tables are then distributed if they are not yet (``ledger.postgres.distribution``).
    """
    if not await pending(connection):
        if not await distribution_pending(connection):
            return []
        async with connection.transaction():
            await connection.execute("select pg_advisory_xact_lock($1)", _LOCK_KEY, timeout=MIGRATION_TIMEOUT_S)
            return await distribute(connection)
    applied_now = []
    async with connection.transaction():
        await connection.execute("select set_config('statement_timeout', '0', true)")
        await connection.execute("select set_config('giftcard.default_tenant', $1, true)", default_tenant)
        await connection.execute("select pg_advisory_xact_lock($1)", _LOCK_KEY, timeout=MIGRATION_TIMEOUT_S)
        await connection.execute(
            """
            create table if not exists schema_migrations (
                version    integer primary key,
                name       text not null,
                applied_at timestamptz not null default clock_timestamp()
            )
            """
        )
        done = {r["version"] for r in await connection.fetch("select version from schema_migrations")}
        for version, name, sql in migration_files():
            if version in done:
                continue
            await connection.execute(sql, timeout=MIGRATION_TIMEOUT_S)
            await connection.execute("insert into schema_migrations (version, name) values ($1, $2)", version, name)
            applied_now.append(f"{version:04d}_{name}")
        applied_now += await distribute(connection)
    return applied_now


def grant_service_role_statements(role: str) -> list[str]:
    """What the service's own role may do: everything it needs, and never rewrite history.

    Run by the schema's owner (``giftcard db grant``). Events can be appended and read,
    but not updated, deleted or truncated; the triggers stay as a second wall.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        raise ValueError(f"role name {role!r} must be a lower-case SQL identifier")
    return [
        f"grant usage on schema public to {role}",
        f"grant select, insert, update, delete on all tables in schema public to {role}",
        f"grant usage, select on all sequences in schema public to {role}",
        f"revoke update, delete, truncate, trigger, references on events from {role}",
        f"revoke insert, update, delete, truncate on schema_migrations from {role}",
    ]


async def create_login_role(connection: asyncpg.Connection, role: str, password: str) -> bool:
    """The service's role, made a login role with ``password`` when it does not exist yet (a fresh
    deployment's first ``db grant``); an existing role is left as it is. True when it was created."""
    grant_service_role_statements(role)  # checks the name
    if await connection.fetchval("select 1 from pg_roles where rolname = $1", role):
        return False
    # No parameters in a utility statement: format's %L quotes the password as a literal.
    statement = await connection.fetchval(
        "select format('create role %I login password %L', $1::text, $2::text)", role, password
    )
    await connection.execute(statement)
    return True


async def grant_service_role(connection: asyncpg.Connection, role: str) -> None:
    """``giftcard db grant``: the statements above, and on Citus what the workers need besides."""
    for statement in grant_service_role_statements(role):
        await connection.execute(statement)
    await grant_on_workers(connection, role)
