"""Fixtures: a real PostgreSQL (embedded unless GIFTCARD_TEST_DATABASE_URL names one) and a
fresh, migrated database for every test, cloned from a template so each starts empty."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ledger.commands import Ledger
from ledger.database import EmbeddedPostgres, create_pool
from ledger.migrate import upgrade
from ledger.store import EventStore

TEMPLATE_DB = "giftcard_template"
SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "spec"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("GIFTCARD_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "pgdata")
    try:
        yield embedded.url
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
async def template_url(server_url: str) -> str:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"drop database if exists {TEMPLATE_DB} with (force)")
        await admin.execute(f"create database {TEMPLATE_DB}")
    finally:
        await admin.close()
    connection = await asyncpg.connect(with_database(server_url, TEMPLATE_DB))
    try:
        await upgrade(connection)
    finally:
        await connection.close()
    return with_database(server_url, TEMPLATE_DB)


@pytest.fixture
async def database_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"create database {name} template {TEMPLATE_DB}")
        yield with_database(server_url, name)
        await admin.execute(f"drop database if exists {name} with (force)")
    finally:
        await admin.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, size_min=1, size_max=10)
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> EventStore:
    return EventStore(pool)


class Clock:
    """A clock the test moves by hand, so time rules are tested without sleeping."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 1, 15, 12, 0, tzinfo=UTC))


@pytest.fixture
def ledger(store: EventStore, clock: Clock) -> Ledger:
    return Ledger(store, code_key=b"k" * 32, clock=clock)
