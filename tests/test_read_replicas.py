"""Read replicas: with GIFTCARD_REPLICA_URL at a hot standby, what only reads is served from it and
states its lag; without it, everything reads the primary as before.

A real primary and synchronous streaming standby (tests/pg_cluster.py). The proof that an answer
came from the standby: replay is paused there, the primary takes new writes, and the answer lacks
them and states a lag, while a protocol read of the card (always the primary) shows them; once
replay resumes the answer catches up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from hub.http.read_pool import LAG_BYTES_HEADER, LAG_SECONDS_HEADER
from ledger.application.commands import Ledger
from ledger.eventstore.store import EventStore
from ledger.postgres.migrate import upgrade
from ledger.postgres.replication import replica_lag
from tests.cards import issue_command
from tests.conftest import HUB_KEY, HUB_TOKEN, Clock, Service, services_on
from tests.giftcard_cli import giftcard
from tests.pg_cluster import ReplicatedPair, free_port, pg_binaries_missing
from tests.test_projections import wait_for

pytestmark = pytest.mark.skipif(pg_binaries_missing() is not None, reason=str(pg_binaries_missing()))


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicatedPair]:
    pair = ReplicatedPair().start()
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
async def database(pair: ReplicatedPair) -> AsyncIterator[str]:
    """A fresh, migrated database on the primary (replicated to the standby); its name."""
    name = f"replica_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pair.primary.url())
    try:
        await admin.execute(f"create database {name}")
        connection = await asyncpg.connect(pair.primary.url(name))
        try:
            await upgrade(connection)
        finally:
            await connection.close()
        # A synchronous commit waits for the standby to flush, not to replay: wait until it has the schema.
        await wait_for(lambda: _reachable(pair.standby.url(name)), "the standby to replay the new database")
        yield name
        await admin.execute(f"drop database if exists {name} with (force)")
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def replay_paused(pair: ReplicatedPair) -> AsyncIterator[None]:
    """The standby keeps receiving WAL but applies none of it until the block ends."""
    standby = await asyncpg.connect(pair.standby.url())
    try:
        await standby.execute("select pg_wal_replay_pause()")
        await wait_for(lambda: _replay_is(standby, "paused"), "replay to pause")
        try:
            yield
        finally:
            await standby.execute("select pg_wal_replay_resume()")
    finally:
        await standby.close()


async def _replay_is(standby: asyncpg.Connection, state: str) -> bool:
    return await standby.fetchval("select pg_get_wal_replay_pause_state()") == state


@pytest.fixture
async def start_hub(database: str, pair: ReplicatedPair) -> AsyncIterator:
    """The service on a loopback port, its database on the primary; ``replica_url`` as GIFTCARD_REPLICA_URL."""
    async with services_on(pair.primary.url(database)) as start:
        yield lambda replica_url: start(replica_url=replica_url)


async def issue_card(service: Service, load: int) -> str:
    status, card, _ = await service.call(
        "POST",
        "/api/giftcards",
        {
            "relationName": f"r-{uuid.uuid4().hex}",
            "caption": "c",
            "profileId": "p",
            "expiringDate": "2030-01-01T00:00:00Z",
        },
    )
    assert status == 200, card
    await transact(service, card["id"], "Credit", load, "load")
    return card["id"]


async def transact(service: Service, card_id: str, operation: str, value: int, request_id: str) -> None:
    body = {"operation": operation, "value": value, "requestId": request_id}
    status, answer, _ = await service.call("POST", f"/api/giftcards/{card_id}/transactions", body)
    assert status == 200, answer


async def protocol_balance(service: Service, card_id: str) -> Decimal:
    status, card, _ = await service.call("GET", f"/api/giftcards/{card_id}")
    assert status == 200, card
    return Decimal(str(card["balance"]))


def projected_on_primary(primary_url: str) -> Callable[[], Awaitable[bool]]:
    """Every read model has applied every event, on the primary (where the runner writes)."""

    async def check() -> bool:
        connection = await asyncpg.connect(primary_url)
        try:
            return await connection.fetchval(
                "select bool_and(events_applied = (select count(*) from events)) from projection_checkpoints"
            )
        finally:
            await connection.close()

    return check


def listed_cards(service: Service) -> Callable[[], Awaitable[set[str]]]:
    async def cards() -> set[str]:
        status, body, _ = await service.call("GET", "/api/ledger/balances")
        assert status == 200, body
        return {item["cardId"] for item in body["items"]}

    return cards


async def test_listings_and_audit_read_the_replica_and_state_its_lag(start_hub, pair, database):
    service = await start_hub(pair.standby.url(database))
    first = await issue_card(service, 100)
    await wait_for(projected_on_primary(pair.primary.url(database)), "the read models on the primary")
    await wait_for(lambda: _has(listed_cards(service), first), "the standby to replay the first card")

    async with replay_paused(pair):
        second = await issue_card(service, 50)
        await transact(service, first, "Debit", 10, "order-1")
        await wait_for(projected_on_primary(pair.primary.url(database)), "the read models on the primary")
        await asyncio.sleep(0.05)  # the replay delay grows while replay is paused

        # Protocol reads are the primary's: they see every write at once.
        assert await protocol_balance(service, second) == 50
        assert await protocol_balance(service, first) == 90

        status, body, headers = await service.call("GET", "/api/ledger/balances")
        assert status == 200
        assert {item["cardId"]: item["balance"] for item in body["items"]} == {first: 100}
        assert float(headers[LAG_SECONDS_HEADER]) > 0 and int(headers[LAG_BYTES_HEADER]) > 0
        assert body["freshness"]["replica"]["lagSeconds"] > 0 and body["freshness"]["replica"]["inRecovery"]

        status, body, headers = await service.call("GET", f"/api/ledger/transactions?card={first}")
        assert status == 200 and [item["operation"] for item in body["items"]] == ["Credit"]
        assert float(headers[LAG_SECONDS_HEADER]) > 0 and body["freshness"]["replica"]["lagSeconds"] > 0

        status, body, headers = await service.call("GET", "/api/projections")
        assert status == 200 and body["replica"]["lagSeconds"] > 0 and LAG_SECONDS_HEADER in headers

        status, body, headers = await service.call("GET", f"/api/audit/cards/{first}")
        assert status == 200 and [event["type"] for event in body["events"]] == ["Issued", "Credited"]
        assert float(headers[LAG_SECONDS_HEADER]) > 0
        status, body, headers = await service.call("GET", f"/api/audit/cards/{second}")
        assert status == 404 and body["error"]["code"] == "card_not_found" and LAG_SECONDS_HEADER in headers

        status, html, headers = await audit_page(service, "/audit")
        assert status == 200 and 'id="replica-lag"' in html and float(headers[LAG_SECONDS_HEADER]) > 0
        status, html, headers = await audit_page(service, f"/audit/cards/{second}")
        assert status == 404 and 'id="replica-lag"' in html and LAG_SECONDS_HEADER in headers

    await wait_for(lambda: _has(listed_cards(service), second), "the standby to catch up once replay resumes")
    await wait_for(lambda: _lag_is_zero(service), "the lag to fall to 0 once everything is replayed")
    status, body, _ = await service.call("GET", f"/api/audit/cards/{first}")
    assert status == 200 and [event["type"] for event in body["events"]] == ["Issued", "Credited", "Debited"]


async def test_without_a_replica_everything_reads_the_primary(start_hub, pair, database):
    service = await start_hub(None)
    async with replay_paused(pair):  # the standby is stale: answers that read it would lack the card
        card = await issue_card(service, 70)
        await wait_for(projected_on_primary(pair.primary.url(database)), "the read models on the primary")
        status, body, headers = await service.call("GET", "/api/ledger/balances")
        assert status == 200 and {item["cardId"]: item["balance"] for item in body["items"]} == {card: 70}
        assert "replica" not in body["freshness"] and LAG_SECONDS_HEADER not in headers
        status, body, headers = await service.call("GET", f"/api/audit/cards/{card}")
        assert status == 200 and LAG_SECONDS_HEADER not in headers
        status, html, headers = await audit_page(service, "/audit")
        assert status == 200 and 'id="replica-lag"' not in html and LAG_SECONDS_HEADER not in headers


async def test_a_replica_that_is_down_fails_only_what_reads_it(start_hub):
    nobody_listens = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    service = await start_hub(nobody_listens)  # starts: no replica connection is opened at start
    card = await issue_card(service, 20)
    assert await protocol_balance(service, card) == 20
    status, body, headers = await service.call("GET", "/api/ledger/balances")
    assert status == 503 and body["error"]["code"] == "unavailable" and headers["Retry-After"] == "1"


async def test_the_cli_exports_and_verifies_on_the_replica_and_reports_its_lag(pair, database, tmp_path):
    primary_url, standby_url = pair.primary.url(database), pair.standby.url(database)
    env = {"GIFTCARD_DATABASE_URL": primary_url, "GIFTCARD_REPLICA_URL": standby_url}
    pool = await asyncpg.create_pool(primary_url, min_size=1, max_size=4)
    try:
        ledger = Ledger(EventStore(pool), b"k" * 32, clock=Clock(datetime(2026, 1, 15, 12, 0, tzinfo=UTC)))
        cards = [str((await ledger.issue(issue_command(ledger.clock()))).card.id) for _ in range(12)]
        for n, card_id in enumerate(cards):
            await ledger.create_transaction(
                card_id, operation="Credit", value=Decimal(10 + n), description="load", request_id="load"
            )
        assert not (await replica_lag(pool)).in_recovery  # the primary is not a standby: nothing to replay
        await wait_for(lambda: _standby_has_events(standby_url, primary_url), "the standby to replay the cards")

        async with replay_paused(pair):
            await ledger.create_transaction(
                cards[0], operation="Debit", value=Decimal(3), description="order", request_id="order-1"
            )
            await asyncio.sleep(0.05)
            code, out, err = await giftcard(
                env, "export", "transactions", "--format", "csv", "--output", str(tmp_path / "a.csv")
            )
            assert code == 0, err
            assert reported_lag_s(err) > 0
            assert [row["operation"] for row in csv_rows(tmp_path / "a.csv")].count("Debit") == 0

            # Verify splits its walk between processes, each importing the snapshot exported on the standby.
            code, out, err = await giftcard(env, "audit", "verify")
            assert code == 0, out + err
            assert reported_lag_s(err) > 0 and "verified 24 event(s)" in out  # not the Debit: not replayed yet
            assert await pool.fetchval("select count(*) from verify_runs") == 1  # recorded on the primary

        await wait_for(lambda: _standby_has_events(standby_url, primary_url), "the standby to catch up")
        code, _, err = await giftcard(
            env, "export", "transactions", "--format", "csv", "--output", str(tmp_path / "b.csv")
        )
        assert code == 0, err
        assert reported_lag_s(err) == 0
        assert [row["operation"] for row in csv_rows(tmp_path / "b.csv")].count("Debit") == 1
    finally:
        await pool.close()


# ---- helpers -------------------------------------------------------------------------------------


async def _has(cards: Callable[[], Awaitable[set[str]]], card_id: str) -> bool:
    return card_id in await cards()


async def _lag_is_zero(service: Service) -> bool:
    _, _, headers = await service.call("GET", "/api/ledger/balances")
    return headers.get(LAG_SECONDS_HEADER) == "0.000"


async def _reachable(url: str) -> bool:
    """The database exists on the standby and its migrations are replayed (the events table is there)."""
    try:
        connection = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        return False
    try:
        return await connection.fetchval("select to_regclass('events') is not null")
    finally:
        await connection.close()


async def _standby_has_events(standby_url: str, primary_url: str) -> bool:
    counts = []
    for url in (primary_url, standby_url):
        connection = await asyncpg.connect(url)
        try:
            counts.append(await connection.fetchval("select count(*) from events"))
        finally:
            await connection.close()
    return counts[0] == counts[1]


async def audit_page(service: Service, path: str) -> tuple[int, str, dict]:
    basic = base64.b64encode(f"{HUB_KEY}:{HUB_TOKEN}".encode()).decode()
    async with service.session.get(service.base_url + path, headers={"Authorization": f"Basic {basic}"}) as response:
        return response.status, await response.text(), dict(response.headers)


def reported_lag_s(stderr: str) -> float:
    lines = [line for line in stderr.splitlines() if "replica lag" in line]
    assert len(lines) == 1, stderr
    return float(lines[0].split("replica lag ", 1)[1].split(" s", 1)[0])


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))
