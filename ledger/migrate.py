"""Schema migrations: numbered ``.sql`` files in ``ledger/migrations``, applied in order, once.

Each file runs in its own transaction and is recorded in ``schema_migrations``; an
advisory lock lets several processes start at once without racing.
"""

from __future__ import annotations

import importlib.resources
import re

import asyncpg

_LOCK_KEY = 0x6769667463617264  # "giftcard"
_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped with the package, in order."""
    found = []
    for entry in importlib.resources.files("ledger.migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text()))
    return sorted(found)


async def upgrade(connection: asyncpg.Connection) -> list[str]:
    """Applies every migration not yet recorded; returns the names applied (empty when current)."""
    applied_now = []
    async with connection.transaction():
        await connection.execute("select pg_advisory_xact_lock($1)", _LOCK_KEY)
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
            await connection.execute(sql)
            await connection.execute("insert into schema_migrations (version, name) values ($1, $2)", version, name)
            applied_now.append(f"{version:04d}_{name}")
    return applied_now
