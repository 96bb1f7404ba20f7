"""Fixtures: a real PostgreSQL (embedded unless GIFTCARD_TEST_DATABASE_URL names one) and a
fresh, migrated database for every test, cloned from a template so each starts empty.

``pytest --on-citus`` runs the suites marked ``also_on_citus`` a second time on a Citus cluster
(a coordinator and two workers on loopback, started once per session): every test then gets a
fresh, migrated, distributed database on it. Tests marked ``single_server("why")`` skip there.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from ledger.application.commands import Ledger
from ledger.eventstore.store import EventStore
from ledger.postgres.database import EmbeddedPostgres, create_pool, database_named
from ledger.postgres.migrate import upgrade
from tests.citus_cluster import CitusCluster, citus_missing

TEMPLATE_DB = "giftcard_template"
SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "spec"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--on-citus",
        action="store_true",
        help="run the suites marked also_on_citus on a Citus cluster (coordinator + 2 workers) instead of one server",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "also_on_citus: a suite or test run on Citus too (--on-citus)")
    config.addinivalue_line("markers", "single_server(reason): not meaningful on a Citus cluster, and why")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under --on-citus: only what is marked also_on_citus, without the single-server tests;
    everything skips, saying why, where no cluster can start."""
    if not config.getoption("--on-citus"):
        return
    selected = [item for item in items if item.get_closest_marker("also_on_citus")]
    config.hook.pytest_deselected(items=[item for item in items if item not in selected])
    items[:] = selected
    missing = citus_missing()
    for item in selected:
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"--on-citus: {missing}"))
        elif marker := item.get_closest_marker("single_server"):
            item.add_marker(pytest.mark.skip(reason=f"single server only: {marker.args[0]}"))


@pytest.fixture(scope="session")
def citus(request: pytest.FixtureRequest) -> Iterator[CitusCluster | None]:
    """Under --on-citus, the cluster every database of the session lives on (always stopped), else None.
    Its nodes start with the template database, the extension in it on each, the workers registered."""
    if not request.config.getoption("--on-citus"):
        yield None
        return
    cluster = CitusCluster(database=TEMPLATE_DB)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def server_url(citus: CitusCluster | None) -> Iterator[str]:
    if citus:
        yield citus.coordinator.url()
        return
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
def server_nodes(server_url: str, citus: CitusCluster | None) -> list[str]:
    """Where each test's database is cloned: the one server, or every node of the cluster, the
    coordinator first (its metadata names the workers' databases by the same name)."""
    return [node.url() for node in citus.nodes] if citus else [server_url]


@pytest.fixture(scope="session")
async def template_url(server_url: str, citus: CitusCluster | None, server_nodes: list[str]) -> str:
    if not citus:  # (on Citus, the cluster started with it)
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f"drop database if exists {TEMPLATE_DB} with (force)")
            await admin.execute(f"create database {TEMPLATE_DB}")
        finally:
            await admin.close()
    connection = await asyncpg.connect(database_named(server_url, TEMPLATE_DB))
    try:
        await upgrade(connection)  # on a Citus coordinator, this distributes the tables too
    finally:
        await connection.close()
    if citus:
        # A database is cloned only while nobody is connected to it, and Citus keeps connections
        # open to its databases (each node's maintenance daemon, and theirs to each other).
        admins = [await asyncpg.connect(node_url) for node_url in server_nodes]
        try:
            await close_to_connections(admins, TEMPLATE_DB)
        finally:
            for admin in admins:
                await admin.close()
    return database_named(server_url, TEMPLATE_DB)


CLOSE_TIMEOUT_S = 30


async def close_to_connections(admins: list[asyncpg.Connection], database: str) -> None:
    """``database`` refuses new connections on every server and has none left.

    On Citus the nodes' maintenance daemons talk to each other's copies of a database, and a
    daemon waiting on another node does not exit when terminated until that wait ends. A DROP
    DATABASE issued then would hold the database's lock, block the other node's connection back
    in (taken before ``allow_connections`` is checked) and wait out its 5 s for nothing. So first
    refuse connections everywhere, then end the sessions until none is left, then drop.
    """
    for admin in admins:
        await admin.execute(f"alter database {database} allow_connections false")
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    while True:
        left = [
            await admin.fetchval(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity"
                " where datname = $1 and pid <> pg_backend_pid()",
                database,
            )
            for admin in admins
        ]
        if not any(left):
            return
        assert time.monotonic() < deadline, f"sessions left in {database} after {CLOSE_TIMEOUT_S} s: {left}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def database_url(server_url: str, template_url: str, server_nodes: list[str]) -> AsyncIterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    # On Citus, one clone on each node (the coordinator's metadata names the workers' databases by
    # its own name); file_copy clones a small database in a third of the time the default takes.
    strategy = " strategy file_copy" if len(server_nodes) > 1 else ""
    admins = [await asyncpg.connect(node_url) for node_url in server_nodes]
    try:
        await asyncio.gather(
            *(admin.execute(f"create database {name} template {TEMPLATE_DB}{strategy}") for admin in admins)
        )
        yield database_named(server_url, name)
        await close_to_connections(admins, name)
        await asyncio.gather(*(admin.execute(f"drop database {name} with (force)") for admin in admins))
    finally:
        for admin in admins:
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
        from hub.http.auth import PROVIDER, audience_of

        if audience_of(path) == PROVIDER:  # /native/…, and /{account}/native/…
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
    from hub.http.server import HubRunner
    from ledger.postgres.credentials_cipher import CredentialsCipher

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
        runner = HubRunner(app)
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
