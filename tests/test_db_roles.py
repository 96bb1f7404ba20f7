"""The service's database role can append and read events but never change or remove them,
even with the triggers switched off: permissions are the first wall, triggers the second."""

from __future__ import annotations

import uuid
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ledger.application.commands import Ledger
from ledger.eventstore.store import EventStore
from ledger.postgres.database import create_pool
from ledger.postgres.migrate import grant_service_role, grant_service_role_statements, upgrade
from ledger.postgres.tenancy import ALL_TENANTS, DEFAULT_TENANT, tenant_scope
from projections import checkpoints, read_models
from projections.runner import ProjectionRunner
from tests.audit_ledgers import finance_cli
from tests.cards import issue
from tests.conftest import services_on


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))


@pytest.fixture
async def service_role_url(database_url: str, pool) -> str:
    role = f"giftcard_app_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"create role {role} login")
    async with pool.acquire() as connection:
        await grant_service_role(connection, role)
    yield as_user(database_url, role)
    await pool.execute(f"drop owned by {role}")
    await pool.execute(f"drop role {role}")


async def test_the_service_role_runs_the_ledger(service_role_url, clock):
    pool = await create_pool(service_role_url, size_min=1, size_max=2)
    try:
        with tenant_scope(DEFAULT_TENANT):  # as a request with a key of the default tenant runs
            async with pool.acquire() as connection:
                assert await upgrade(connection) == [], "a current schema needs no DDL rights"
            ledger = Ledger(EventStore(pool), code_key=b"k" * 32, clock=clock)
            card = (await issue(ledger)).card
            await ledger.create_transaction(
                str(card.id), operation="Credit", value=Decimal(5), description="x", request_id="r"
            )
            assert (await ledger.card(str(card.id))).balance == 500
    finally:
        await pool.close()


@pytest.mark.parametrize(
    "statement",
    [
        "update events set type = 'Forged'",
        "delete from events",
        "truncate events",
        "alter table events disable trigger user",
        "insert into schema_migrations (version, name) values (999, 'x')",
    ],
)
async def test_the_service_role_cannot_rewrite_history(service_role_url, ledger, statement):
    await issue(ledger)
    connection = await asyncpg.connect(service_role_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute(statement)
    finally:
        await connection.close()


def test_role_names_are_checked():
    with pytest.raises(ValueError):
        grant_service_role_statements("app; drop table events")


async def test_the_service_role_serves_and_projects(service_role_url):
    """What the compose file runs as giftcard_app: the hub (a card created and read over HTTP) and
    the projection worker (the read models caught up, their status read)."""
    async with services_on(service_role_url) as start:
        service = await start()
        status, card, _ = await service.call(
            "POST",
            "/api/giftcards",
            {"relationName": "r", "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"},
        )
        assert status == 200, card
    pool = await create_pool(service_role_url, size_min=1, size_max=2)
    try:
        with tenant_scope(ALL_TENANTS):  # as the projection worker runs
            assert await ProjectionRunner(pool, read_models("VtexGiftCard")).catch_up() > 0
            assert all(status.lag_events == 0 for status in await checkpoints.statuses(pool))
    finally:
        await pool.close()


async def test_db_grant_creates_the_service_role_once_and_never_prints_its_password(database_url, pool):
    """A fresh deployment (compose's migrate jobs) makes the service's role with ``db grant``."""
    role, password = f"giftcard_app_{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex
    env = {"SERVICE_ROLE_PASSWORD": password}
    try:
        code, out, err = await finance_cli(
            database_url, "db", "grant", role, "--create-with-password-env", "SERVICE_ROLE_PASSWORD", env=env
        )
        assert code == 0, err
        assert f"created login role {role}" in out and password not in out + err
        assert await pool.fetchval("select rolcanlogin from pg_roles where rolname = $1", role)
        assert await pool.fetchval("select has_table_privilege($1, 'events', 'INSERT')", role)
        assert not await pool.fetchval("select has_table_privilege($1, 'events', 'UPDATE')", role)
        code, out, err = await finance_cli(
            database_url, "db", "grant", role, "--create-with-password-env", "SERVICE_ROLE_PASSWORD", env=env
        )
        assert code == 0 and "created" not in out, "an existing role is left as it is"
        code, out, err = await finance_cli(
            database_url, "db", "grant", role, "--create-with-password-env", "UNSET_VARIABLE_X"
        )
        assert code == 2 and "UNSET_VARIABLE_X is not set" in err
    finally:
        if await pool.fetchval("select 1 from pg_roles where rolname = $1", role):
            await pool.execute(f"drop owned by {role}")
            await pool.execute(f"drop role {role}")
