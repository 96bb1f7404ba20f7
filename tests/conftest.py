"""Fixtures: a real PostgreSQL (embedded unless GIFTCARD_TEST_DATABASE_URL names one) and a
fresh, migrated database for every test, cloned from a template so each starts empty."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from ledger.commands import Ledger
from ledger.database import EmbeddedPostgres, create_pool, database_named
from ledger.migrate import upgrade
from ledger.store import EventStore

TEMPLATE_DB = "giftcard_template"
SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "spec"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    configured = os.environ.get("GIFTCARD_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    # A folder of its own, not pytest's tmp_path: pytest prunes old base folders, and a second
    # pytest run on the same machine would delete a running server's data from under it.
    folder = Path(tempfile.mkdtemp(prefix="giftcard-test-pg-"))
    embedded = EmbeddedPostgres(folder / "pgdata")
    try:
        yield embedded.url
    finally:
        embedded.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
async def template_url(server_url: str) -> str:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"drop database if exists {TEMPLATE_DB} with (force)")
        await admin.execute(f"create database {TEMPLATE_DB}")
    finally:
        await admin.close()
    connection = await asyncpg.connect(database_named(server_url, TEMPLATE_DB))
    try:
        await upgrade(connection)
    finally:
        await connection.close()
    return database_named(server_url, TEMPLATE_DB)


@pytest.fixture
async def database_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"create database {name} template {TEMPLATE_DB}")
        yield database_named(server_url, name)
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


# ---- the service on a loopback port ----------------------------------------------

HUB_KEY, HUB_TOKEN = "hub-key", "hub-token"
PROVIDER_KEY, PROVIDER_TOKEN = "provider-key", "provider-token"


class Service:
    """The whole service on 127.0.0.1, and a client that speaks to it with valid credentials."""

    def __init__(self, base_url: str, session, app) -> None:
        self.base_url = base_url
        self.session = session
        self.app = app

    def headers(self, path: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        if path.startswith("/native"):
            auth = {"X-PROVIDER-API-AppKey": PROVIDER_KEY, "X-PROVIDER-API-AppToken": PROVIDER_TOKEN}
        else:
            auth = {"X-VTEX-API-AppKey": HUB_KEY, "X-VTEX-API-AppToken": HUB_TOKEN}
        return {"Accept": "application/json", "Content-Type": "application/json", **auth, **(extra or {})}

    async def call(self, method: str, path: str, body=None, *, headers=None, data=None):
        """(status, decoded JSON or None, response headers)."""
        async with self.session.request(
            method, self.base_url + path, json=body, data=data, headers=self.headers(path, headers)
        ) as response:
            raw = await response.read()
            return response.status, (json.loads(raw) if raw else None), response.headers


TEST_SECRET_KEY = "test-secret-key"


@asynccontextmanager
async def services_on(database_url: str, **app_options) -> AsyncIterator:
    """A starter of services on ``database_url`` (``create_app``'s keyword options beside the
    settings); every one it starts is stopped when the block ends."""
    import aiohttp
    from aiohttp import web

    from hub.app import create_app
    from hub.config import Settings
    from ledger.credentials_cipher import CredentialsCipher

    runners = []
    sessions = []

    async def start(**overrides) -> Service:
        overrides.setdefault("provider_allowlist", ("127.0.0.0/8",))  # test providers live on loopback
        settings = Settings(
            app_key=HUB_KEY,
            app_token=HUB_TOKEN,
            provider_app_key=PROVIDER_KEY,
            provider_app_token=PROVIDER_TOKEN,
            **overrides,
        )
        app = create_app(settings, database_url, cipher=CredentialsCipher(TEST_SECRET_KEY), **app_options)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Service(f"http://127.0.0.1:{port}", session, app)

    try:
        yield start
    finally:
        for session in sessions:
            await session.close()
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def start_service(database_url: str, clock: Clock) -> AsyncIterator:
    """Starts the service with the given setting overrides; every one started is stopped after the test."""
    async with services_on(database_url, clock=clock) as start:
        yield start


@pytest.fixture
async def service(start_service) -> Service:
    return await start_service()


@pytest.fixture
async def http() -> AsyncIterator:
    """A client session for tests that drive ``giftcard serve`` processes (tests/hub_process.py).
    No connection limit here: the loads' own semaphores bound what is in flight."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session
