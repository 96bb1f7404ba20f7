"""Many stores on one deployment: a key's tenant is the boundary, and PostgreSQL enforces it.

Two tenants over real HTTP each see only their own cards, codes, searches and providers, though
they hold the same relationName, redemption code and provider id; as the service's own database
role, a query that forgets its tenant finds nothing; a single-store database upgrades in place.

The service here runs as the role ``giftcard db grant`` sets up, as deployed: a superuser (the
other suites' role) passes through row-level security, which is the point of these tests.
Under ``--on-citus`` they run on a Citus cluster, where the rows of events, snapshots and
card_lookup live on the workers and the boundary must hold there too.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal

import asyncpg
import pytest

from hub.http import auth
from hub.providers.egress import EgressPolicy
from hub.webhooks import storage
from hub.webhooks.delivery import Deliverer, delivery_client
from ledger.application import commands
from ledger.application.commands import Ledger
from ledger.domain.errors import CardNotFound
from ledger.eventstore.codec import canonical_json
from ledger.eventstore.store import GENESIS_HASH, EventStore, NewEvent, OneEvent, Snapshot, StreamAppend, chain_hash
from ledger.postgres.database import create_pool, database_named
from ledger.postgres.migrate import migration_files, upgrade
from ledger.postgres.tenancy import ALL_TENANTS, tenant_scope
from projections import read_models
from projections.runner import ProjectionRunner
from tests.cards import issue
from tests.conftest import PROVIDER_KEY, PROVIDER_TOKEN, services_on
from tests.plans import indexes_used, rows_examined
from tests.test_db_roles import as_user, service_role_url  # noqa: F401 (a fixture)
from tests.test_security import ROOT, eventually
from tests.test_webhooks import CIPHER, FAST, SETTINGS, receiving, subscribe

ACME, GLOBEX = "acme", "globex"
SAME_CODE = "SAME-C0DE-BTH5-XYZ7"  # in the codes' alphabet (no I, L, O, U)
POLICY = EgressPolicy(SETTINGS.provider_allowlist)
TENANT_TABLES = ("events", "card_lookup", "personal_data_keys", "api_keys", "providers")

pytestmark = pytest.mark.also_on_citus


class Store:
    """One tenant's hub and provider key pairs, and a client that calls with them."""

    def __init__(self, service, hub: tuple[str, str], provider: tuple[str, str]) -> None:
        self.service, self.hub, self.provider = service, hub, provider

    async def call(self, method: str, path: str, body=None):
        if auth.audience_of(path) == auth.PROVIDER:  # /native/…, and /{account}/native/…
            headers = {"X-PROVIDER-API-AppKey": self.provider[0], "X-PROVIDER-API-AppToken": self.provider[1]}
        else:
            headers = {"X-VTEX-API-AppKey": self.hub[0], "X-VTEX-API-AppToken": self.hub[1]}
        status, body, _ = await self.service.call(method, path, body, headers=headers)
        return status, body


async def store_of(service, pool, tenant: str) -> Store:
    hub = await auth.create_key(pool, auth.HUB, auth.ROLES, tenant)
    provider = await auth.create_key(pool, auth.PROVIDER, auth.ROLES, tenant)
    store = Store(service, hub, provider)
    await eventually(lambda: _answers(store, "GET", "/api/giftcards/00000000-0000-0000-0000-000000000000", 404))
    return store


async def _answers(store: Store, method: str, path: str, status: int) -> bool:
    return (await store.call(method, path))[0] == status


def card_body(relation_name: str) -> dict:
    return {
        "relationName": relation_name,
        "caption": "Loyalty",
        "profileId": "shopper@example.com",  # the same shopper in both stores
        "expiringDate": "2030-01-01T00:00:00Z",
        "currencyCode": "USD",
    }


@pytest.fixture
async def service(service_role_url, clock):  # noqa: F811
    async with services_on(service_role_url, clock=clock) as start:
        yield await start()


async def test_two_tenants_see_only_their_own_cards_codes_and_searches(service, pool, monkeypatch):
    acme, globex = await store_of(service, pool, ACME), await store_of(service, pool, GLOBEX)
    monkeypatch.setattr(commands, "new_redemption_code", lambda: SAME_CODE)  # both stores draw the same code
    status, acme_card = await acme.call("POST", "/native/giftcards", card_body("gift-1"))
    assert status == 200, acme_card
    status, globex_card = await globex.call("POST", "/native/giftcards", card_body("gift-1"))
    assert status == 200, globex_card
    assert acme_card["redemptionCode"] == globex_card["redemptionCode"] == SAME_CODE
    monkeypatch.undo()
    status, again = await acme.call("POST", "/native/giftcards", card_body("gift-1"))
    assert status == 409, "a relationName is still unique inside its store"

    credit = {"operation": "Credit", "value": 30, "description": "load", "requestId": "r1"}
    assert (await acme.call("POST", f"/native/giftcards/{acme_card['id']}/transactions", credit))[0] == 200

    # Another store's card is not there at all, on every surface and verb: not 403, 404.
    for path in (f"/native/giftcards/{acme_card['id']}", f"/api/giftcards/{acme_card['id']}"):
        status, body = await globex.call("GET", path)
        assert status == 404, body
    status, body = await globex.call("POST", f"/native/giftcards/{acme_card['id']}/transactions", credit)
    assert status == 404, body
    assert (await acme.call("GET", f"/api/giftcards/{acme_card['id']}"))[1]["balance"] == 30
    assert (await globex.call("GET", f"/api/giftcards/{globex_card['id']}"))[1]["balance"] == 0
    # A search by code skips empty cards: globex's gets its own load (the same requestId, its own card).
    assert (await globex.call("POST", f"/native/giftcards/{globex_card['id']}/transactions", credit))[0] == 200

    search = {"client": {"id": "c1", "email": "x@example.com", "document": "1"}, "cart": {"redemptionCode": SAME_CODE}}
    for store, card in ((acme, acme_card), (globex, globex_card)):
        status, found = await store.call("POST", "/native/giftcards/_search", search)
        assert status == 200 and [f["id"] for f in found] == [card["id"]]

    # The env pair is the default tenant's: it sees neither store's cards.
    assert (await service.call("GET", f"/api/giftcards/{acme_card['id']}"))[0] == 404
    assert (await service.call("POST", "/native/giftcards/_search", search))[1] == []

    rows = await pool.fetch(
        "select distinct stream_id, tenant_id from events where stream_id = any($1::text[])",
        [acme_card["id"], globex_card["id"]],
    )
    assert {(r["stream_id"], r["tenant_id"]) for r in rows} == {(acme_card["id"], ACME), (globex_card["id"], GLOBEX)}


async def test_each_tenant_registers_and_lists_its_own_providers(service, pool):
    acme, globex = await store_of(service, pool, ACME), await store_of(service, pool, GLOBEX)
    body = {"serviceUrl": "http://127.0.0.1:9/v1", "appKey": "k", "appToken": "t"}
    assert (await acme.call("PUT", "/api/giftcardproviders/Ext", {**body, "caption": "acme's"}))[0] == 200
    assert (await globex.call("PUT", "/api/giftcardproviders/Ext", {**body, "caption": "globex's"}))[0] == 200
    assert (await acme.call("GET", "/api/giftcardproviders/Ext"))[1]["caption"] == "acme's"
    assert (await globex.call("GET", "/api/giftcardproviders/Ext"))[1]["caption"] == "globex's"
    assert (await service.call("GET", "/api/giftcardproviders/Ext"))[0] == 404, "the default tenant has none"
    assert (await acme.call("DELETE", "/api/giftcardproviders/Ext"))[0] == 200
    assert (await acme.call("GET", "/api/giftcardproviders/Ext"))[0] == 404
    assert (await globex.call("GET", "/api/giftcardproviders/Ext"))[0] == 200, "removing one store's leaves the other's"


async def _lists_only(store: Store, cards: set[str]) -> bool:
    status, body = await store.call("GET", "/api/ledger/balances")
    return status == 200 and {item["cardId"] for item in body["items"]} == cards


async def test_each_tenant_audits_and_lists_only_its_own_cards(service, pool):
    """The auditor's API replays a store's own cards and finds no other's; the read models (the
    read API, finance's exports) list each store's cards only, though one projection runner
    projects every store's events."""
    acme, globex = await store_of(service, pool, ACME), await store_of(service, pool, GLOBEX)
    credit = {"operation": "Credit", "value": 30, "description": "load", "requestId": "r1"}
    cards = {}
    for name, store in ((ACME, acme), (GLOBEX, globex)):
        status, card = await store.call("POST", "/native/giftcards", card_body("gift-1"))
        assert status == 200, card
        assert (await store.call("POST", f"/native/giftcards/{card['id']}/transactions", credit))[0] == 200
        cards[name] = card["id"]
    status, audit = await acme.call("GET", f"/api/audit/cards/{cards[ACME]}")
    assert status == 200, audit
    status, body = await globex.call("GET", f"/api/audit/cards/{cards[ACME]}")
    assert status == 404 and body["error"]["code"] == "card_not_found"
    await eventually(lambda: _lists_only(acme, {cards[ACME]}))
    await eventually(lambda: _lists_only(globex, {cards[GLOBEX]}))
    assert (await globex.call("GET", f"/api/ledger/balances/{cards[ACME]}"))[0] == 404


async def issue_in(ledger: Ledger, tenant: str, relation_name: str) -> str:
    with tenant_scope(tenant):
        return str((await issue(ledger, relation_name=relation_name, profile_id="same-person")).card.id)


async def test_row_level_security_refuses_unscoped_reads_as_the_service_role(ledger, service_role_url):  # noqa: F811
    acme_card = await issue_in(ledger, ACME, "r")
    globex_card = await issue_in(ledger, GLOBEX, "r")
    connection = await asyncpg.connect(service_role_url)
    try:
        for table in TENANT_TABLES:  # a query that forgets its tenant, on a session that never set one
            assert await connection.fetchval(f"select count(*) from {table}") == 0, table
    finally:
        await connection.close()
    pool = await create_pool(service_role_url, size_min=1, size_max=1)  # as the service runs its statements
    try:
        for table in TENANT_TABLES:  # no scope: nothing
            assert await pool.fetchval(f"select count(*) from {table}") == 0, table
        with tenant_scope(ACME):
            assert {r["stream_id"] for r in await pool.fetch("select stream_id from events")} == {acme_card}
            assert await pool.fetchval("select count(*) from card_lookup where card_id = $1", globex_card) == 0
            assert await pool.fetchval("select count(*) from personal_data_keys") == 1
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # nor may it write another store's row
                await pool.execute(
                    "insert into card_lookup (card_id, code_hash, relation_name, profile_id, tenant_id)"
                    " values ('x', '\\x00', 'x', 'x', $1)",
                    GLOBEX,
                )
            async with pool.acquire() as connection, connection.transaction():  # inside a transaction too
                assert await connection.fetchval("select count(distinct tenant_id) from events") == 1
        with tenant_scope(ALL_TENANTS):
            assert await pool.fetchval("select count(distinct tenant_id) from events") == 2, "the operator's scope"
    finally:
        await pool.close()


async def test_the_cache_of_one_process_never_hands_a_card_to_another_tenant(service_role_url, clock):  # noqa: F811
    pool = await create_pool(service_role_url, size_min=1, size_max=2)
    try:
        await _cached_card_stays_in_its_tenant(Ledger(EventStore(pool), code_key=b"k" * 32, clock=clock))
    finally:
        await pool.close()


async def test_snapshots_written_together_are_each_their_cards_store(service_role_url, clock):  # noqa: F811
    pool = await create_pool(service_role_url, size_min=1, size_max=2)
    try:
        ledger = Ledger(EventStore(pool), code_key=b"k" * 32, clock=clock, snapshot_interval_events=2)
        cards = {tenant: await issue_in(ledger, tenant, "r") for tenant in (ACME, GLOBEX)}
        for tenant, card_id in cards.items():  # version 2 makes each card's snapshot due, in its store
            with tenant_scope(tenant):
                await ledger.create_transaction(
                    card_id, operation="Credit", value=Decimal(1), description="", request_id="r"
                )
        await ledger.snapshots_saved()  # one writer, for both stores
        with tenant_scope(ALL_TENANTS):
            rows = await pool.fetch("select stream_id, tenant_id from snapshots")
        assert {row["stream_id"]: row["tenant_id"] for row in rows} == {card: t for t, card in cards.items()}
        # A newer snapshot that names another store never replaces a card's.
        await ledger.store.save_snapshots([Snapshot(cards[ACME], 9, b"h", b"s", GLOBEX)])
        with tenant_scope(ALL_TENANTS):
            kept = await pool.fetchrow("select version, tenant_id from snapshots where stream_id = $1", cards[ACME])
        assert tuple(kept) == (2, ACME)
    finally:
        await pool.close()


async def _cached_card_stays_in_its_tenant(ledger: Ledger) -> None:
    card_id = await issue_in(ledger, ACME, "r")
    with tenant_scope(ACME):
        assert (await ledger.card(card_id)).balance == 0  # cached now
    with tenant_scope(GLOBEX), pytest.raises(CardNotFound):
        await ledger.card(card_id)


# ---- upgrading a single-store database in place -------------------------------------------------


async def database_at_0015(server_url: str, name: str) -> str:
    """A new database with the schema as it was before tenants (migrations 0001 to 0015)."""
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"create database {name}")
    finally:
        await admin.close()
    url = database_named(server_url, name)
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "create table schema_migrations (version integer primary key, name text not null,"
            " applied_at timestamptz not null default clock_timestamp())"
        )
        for version, migration, sql in migration_files():
            if version <= 15:
                await connection.execute(sql)
                await connection.execute("insert into schema_migrations values ($1, $2)", version, migration)
    finally:
        await connection.close()
    return url


@pytest.mark.single_server("a database built migration by migration, not cloned onto the cluster")
async def test_a_single_store_database_upgrades_in_place(server_url, clock):
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = await database_at_0015(server_url, name)
    old_key, old_token = "giftcard-hub-0123456789ab", "an-operator-made-token"
    pool = await create_pool(url, size_min=1, size_max=4)
    try:
        ledger = Ledger(EventStore(pool), code_key=b"k" * 32, clock=clock)
        card_id = str((await issue(ledger, relation_name="before-tenants")).card.id)  # as the old release wrote it
        await pool.execute(
            "insert into api_keys (app_key, token_hash, audience) values ($1, $2, 'hub')",
            old_key,
            auth.token_hash(old_token),
        )
        async with pool.acquire() as connection:
            assert "0016_tenants" in await upgrade(connection, default_tenant="oldstore")
        assert await pool.fetchval("select array_agg(account) from tenants") == ["oldstore"]
        for table in TENANT_TABLES[:-1]:
            assert set(await pool.fetchval(f"select array_agg(distinct tenant_id) from {table}")) == {"oldstore"}
    finally:
        await pool.close()
    async with services_on(url, clock=clock) as start:
        service = await start(default_tenant="oldstore")
        status, card, _ = await service.call("GET", f"/api/giftcards/{card_id}")  # the env pair: oldstore's
        assert status == 200 and card["relationName"] == "before-tenants"
        stored = Store(service, (old_key, old_token), (PROVIDER_KEY, PROVIDER_TOKEN))
        assert (await stored.call("GET", f"/api/giftcards/{card_id}"))[0] == 200, "a stored key keeps working"
        status, body, _ = await service.call("POST", "/api/giftcards", card_body("before-tenants"))
        assert status == 409, "its relationNames are still taken in its own store"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"drop database {name} with (force)")
    finally:
        await admin.close()


# ---- giftcard keys create --tenant ---------------------------------------------------------------


def run_cli(database_url: str, *args: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "GIFTCARD_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "hub.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


async def test_keys_create_for_a_tenant(service, database_url, pool):
    done = await asyncio.to_thread(run_cli, database_url, "keys", "create", "--tenant", ACME)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    store = Store(service, (lines["X-VTEX-API-AppKey"], lines["X-VTEX-API-AppToken"]), ("", ""))
    await eventually(lambda: _answers(store, "GET", "/api/giftcards/00000000-0000-0000-0000-000000000000", 404))
    status, card = await store.call("POST", "/api/giftcards", card_body("r"))
    assert status == 200
    with tenant_scope(ALL_TENANTS):
        assert await pool.fetchval("select tenant_id from card_lookup where card_id = $1", card["id"]) == ACME
    assert await pool.fetchval("select account from tenants where account = $1", ACME) == ACME
    listing = await asyncio.to_thread(run_cli, database_url, "keys", "list")
    assert f"{lines['X-VTEX-API-AppKey']}" in listing.stdout and ACME in listing.stdout


def test_keys_create_refuses_a_tenant_that_is_no_account_name(database_url):
    done = run_cli(database_url, "keys", "create", "--tenant", "Not An Account")
    assert done.returncode == 2 and "'Not An Account' is not a VTEX account name" in done.stderr


async def test_a_role_that_bypasses_row_level_security_serves_only_the_default_tenant(start_service, pool):
    service = await start_service()  # as a superuser, which row-level security lets through
    key, token = await auth.create_key(pool, auth.HUB, auth.ROLES, ACME)
    store = Store(service, (key, token), ("", ""))
    await asyncio.sleep(auth.KEY_REFRESH_S + 0.5)
    status, body = await store.call("GET", "/api/giftcards/00000000-0000-0000-0000-000000000000")
    assert status == 403 and body["error"]["code"] == "tenant_not_isolated" and "'acme'" in body["error"]["message"]
    assert (await service.call("GET", "/api/giftcards/00000000-0000-0000-0000-000000000000"))[0] == 404


async def test_each_source_counts_one_commit_order_for_every_tenant(ledger, service_role_url):  # noqa: F811
    """The seq an event takes in its source counts every store's events, not only those in scope."""
    pool = await create_pool(service_role_url, size_min=1, size_max=2)
    try:
        role_ledger = Ledger(EventStore(pool), code_key=b"k" * 32, clock=ledger.clock)
        for i in range(40):  # 40 cards over 16 sources: stores take turns in most of them
            await issue_in(role_ledger, (ACME, GLOBEX)[i % 2], f"r{i}")
    finally:
        await pool.close()
    duplicates = await ledger.store.pool.fetchval(
        "select count(*) from (select source, seq from events group by source, seq having count(*) > 1) d"
    )
    assert duplicates == 0


async def test_a_group_commit_appends_to_a_stream_only_the_rows_of_its_store(ledger, service_role_url):  # noqa: F811
    """One statement commits several stores' Debits, each row naming its store. A row that names
    acme but extends globex's card is refused by the guard, whatever else the group holds (before,
    the statement ran in the scope of the rows' own stores, which let such a row through as soon as
    a row of globex came along), and the group's other rows go in."""
    globex_card = await issue_in(ledger, GLOBEX, "theirs")
    [issued] = await ledger.store.read_stream(globex_card)
    data = b"{}"

    def row(stream_id: str, version: int, previous: bytes, tenant: str) -> OneEvent:
        hashed = chain_hash(previous, stream_id, version + 1, "test.Noise", data)
        return OneEvent(stream_id, version, NewEvent("test.Noise", data), previous, hashed, None, None, tenant)

    pool = await create_pool(service_role_url, size_min=1, size_max=2)
    try:
        appended = await EventStore(pool).append_each([
            row(globex_card, issued.version, issued.hash, ACME),
            row("globex-new", 0, GENESIS_HASH, GLOBEX),
            row("acme-new", 0, GENESIS_HASH, ACME),
        ])  # fmt: skip
    finally:
        await pool.close()
    assert appended == {"globex-new", "acme-new"}
    assert [e.version for e in await ledger.store.read_stream(globex_card)] == [issued.version]


# ---- a store's webhook reads -------------------------------------------------------------------

OTHER_STORES_EVENTS = 2000
ROWS_EXAMINED_MAX = 50  # a quiet store's batch: an index probe or two per source, none of the other store's rows


@pytest.mark.single_server(
    "a plan read by EXPLAIN: on Citus it is the coordinator's, the shards' indexes are not in it"
)
async def test_a_quiet_stores_webhook_batch_reads_none_of_another_stores_events(ledger, service_role_url):  # noqa: F811
    """acme's subscription stands behind 2,000 events of globex. Its batch, its lag and its listing
    read acme's rows alone, through events_by_tenant (migration 0021): row-level security would
    hand back the same rows, but only after reading globex's and dropping them, at every poll.
    Measured by EXPLAIN (ANALYZE) of the very statements the deliverer sent, as the service's role."""
    pool = await create_pool(service_role_url, size_min=2, size_max=2)
    sent = await statements_logged(pool)
    try:
        async with receiving() as receiver:
            with tenant_scope(ACME):
                subscription = await subscribe(pool, receiver)
                store = EventStore(pool)
                checkpoint = (await storage.get(pool, subscription.id)).checkpoint
            await append_noise(ledger.store, GLOBEX, OTHER_STORES_EVENTS)
            acme_card = await issue_in(ledger, ACME, "quiet")
            [acme_event] = await ledger.store.read_stream(acme_card)
            with tenant_scope(ACME):
                assert await store.next_recorded_at(checkpoint) == acme_event.recorded_at, "acme's lag: its event"
            del sent[:]

            async with delivery_client(POLICY) as client:
                deliverer = Deliverer(pool, client, CIPHER, FAST)
                assert (await deliverer.deliver_batch(subscription.id)).handled == 1
                assert (await deliverer.deliver_batch(subscription.id)).handled == 0
            with tenant_scope(ACME):
                [listed] = await storage.list_subscriptions(pool)
            assert [r.payload["cardId"] for r in receiver.first_receipts()] == [acme_card] and listed.lag_events == 0

            reads = [logged for logged in list(sent) if _reads_commit_order(logged.query)]
            with tenant_scope(ACME):
                plans = [await explained(pool, logged) for logged in reads]
    finally:
        await pool.close()
    assert len(plans) == 3, "two batches' reads and the listing's head"
    for plan in plans:
        assert rows_examined(plan) <= ROWS_EXAMINED_MAX, (rows_examined(plan), indexes_used(plan))
        assert indexes_used(plan) == {"events_by_tenant"}


async def test_a_quiet_stores_subscription_is_not_due_again_for_another_stores_events(ledger, service_role_url):  # noqa: F811
    """Its short batch stands its checkpoint at the head the poll read first: without that, every poll
    would take a turn for it (lock, load, read, unlock) as long as any other store writes."""
    pool = await create_pool(service_role_url, size_min=1, size_max=2)
    try:
        async with receiving() as receiver, delivery_client(POLICY) as client:
            with tenant_scope(ACME):
                subscription = await subscribe(pool, receiver)
            await append_noise(ledger.store, GLOBEX, 50)
            with tenant_scope(ALL_TENANTS):
                deliverer = Deliverer(pool, client, CIPHER, FAST)
                assert subscription.id in (await storage.due_subscriptions(pool))[0]
                assert await deliverer.run_once() == 0
                assert subscription.id not in (await storage.due_subscriptions(pool))[0]
                acme_card = await issue_in(ledger, ACME, "later")
                assert subscription.id in (await storage.due_subscriptions(pool))[0]
                assert await deliverer.run_once() == 1
            assert [r.payload["cardId"] for r in receiver.first_receipts()] == [acme_card]
    finally:
        await pool.close()


async def test_the_projection_runner_applies_a_batch_of_many_stores_at_once(ledger, service_role_url):  # noqa: F811
    """Many stores' Debits interleave in the commit order. A batch is applied at once, in every
    store's scope, each row naming its store: no scope and statements per store (with 100 stores
    writing, nearly one set per event). Each store's rows are its own: its cards, its
    transactions, its daily totals."""
    cards = {ACME: set(), GLOBEX: set()}
    for n in range(24):  # over the lanes of the commit order, so the two stores' events interleave
        tenant = (ACME, GLOBEX)[n % 2]
        card = await issue_in(ledger, tenant, f"interleaved-{n}")
        cards[tenant].add(card)
        with tenant_scope(tenant):
            await ledger.create_transaction(
                card, operation="Credit", value=Decimal(n + 1), description="x", request_id=f"r{n}"
            )
    pool = await create_pool(service_role_url, size_min=1, size_max=2)
    try:
        scopes = await scopes_set_catching_up(pool)
        assert scopes == [], scopes
        loaded = {ACME: sum(n + 1 for n in range(0, 24, 2)), GLOBEX: sum(n + 1 for n in range(1, 24, 2))}
        for tenant, own in cards.items():
            with tenant_scope(tenant):
                balances = {row["card_id"] for row in await pool.fetch("select card_id from read_card_balances")}
                history = {row["card_id"] for row in await pool.fetch("select card_id from read_transactions")}
                issued, credited = await pool.fetchrow(
                    "select sum(cards_issued)::int, sum(loaded)::bigint from read_daily_totals"
                )
            assert balances == own and history == own, tenant
            assert (issued, credited) == (len(own), loaded[tenant] * 100), tenant
    finally:
        await pool.close()


async def test_a_stores_forwarded_calls_in_a_batch_take_its_scope_once(ledger, service_role_url):  # noqa: F811
    """Forwarded calls are applied by handlers, in their store's scope, which writes their rows'
    tenant: set once for a stretch of one store's events, and back to every store's once, not twice
    an event. The rows are that store's alone."""
    calls = [
        NewEvent("ProviderCallForwarded", canonical_json(json.dumps({
            "operation": "CreateGiftCardTransaction", "providerId": "Acme", "cardId": "7", "transactionId": f"t{n}",
            "value": "2.5", "requestId": f"r{n}", "outcome": "ok", "httpStatus": 200, "latencyMs": 1.0,
        })))
        for n in range(4)
    ]  # fmt: skip
    with tenant_scope(ACME):
        await ledger.store.append("forwarded-acme", 0, calls)  # one stream: one source, in a row
    pool = await create_pool(service_role_url, size_min=1, size_max=2)
    try:
        scopes = await scopes_set_catching_up(pool)
        with tenant_scope(ACME):
            acme_rows = await pool.fetchval("select count(*) from read_transactions where provider = 'Acme'")
        with tenant_scope(GLOBEX):
            globex_rows = await pool.fetchval("select count(*) from read_transactions where provider = 'Acme'")
    finally:
        await pool.close()
    # once in and once out in each of transaction_history and daily_totals (side by side); card_balances none
    assert sorted(scopes) == sorted([ACME, ALL_TENANTS] * 2), scopes
    assert (acme_rows, globex_rows) == (4, 0)


def _reads_commit_order(query: str) -> bool:
    return "from events where tenant_id" in query or "from events where source" in query


async def scopes_set_catching_up(pool: asyncpg.Pool) -> list[str]:
    """A projection runner catches up every store's events on ``pool``; the scopes its batches set
    on the way (BatchScope's statement), in the order sent."""
    sent = await statements_logged(pool)
    with tenant_scope(ALL_TENANTS):
        assert await ProjectionRunner(pool, read_models("VtexGiftCard")).catch_up() > 0
    return [logged.args[0] for logged in sent if "set_config('giftcard.tenant', $1, true)" in logged.query]


async def statements_logged(pool: asyncpg.Pool) -> list:
    """Every statement the pool's connections send from now on (asyncpg's LoggedQuery: query, args)."""
    sent: list = []
    connections = [await pool.acquire() for _ in range(pool.get_max_size())]
    for connection in connections:
        connection.add_query_logger(sent.append)
        await pool.release(connection)
    return sent


async def explained(pool: asyncpg.Pool, logged) -> dict:
    async with pool.acquire() as connection:
        text = await connection.fetchval(
            "explain (analyze, buffers, format json) " + logged.query, *logged.args, column=0
        )
    return json.loads(text)[0]["Plan"]


async def append_noise(store: EventStore, tenant: str, count: int) -> None:
    """``count`` events of ``tenant``, one a stream over every source; a webhook never renders them."""
    with tenant_scope(tenant):
        for first in range(0, count, 1000):
            appends = [
                StreamAppend(f"noise-{n}", 0, [NewEvent("test.Noise", b"{}")]) for n in range(first, first + 1000)
            ]
            await store.append_many(appends)


# ---- every store's reads of the commit order, as the service's role ----------------------------

NOISE_EVENTS = 3200  # 200 a source
ROWS_READ_MAX = 3  # a source's last row, or the few after a checkpoint; a scan reads the source's 200


@pytest.mark.single_server("plans read by auto_explain on the coordinator; a shard's are its worker's")
async def test_every_stores_reads_of_the_commit_order_take_the_index_with_no_statistics(
    ledger,
    database_url,
    service_role_url,  # noqa: F811
):
    """Row-level security hides from the planner how many rows its policy lets through. With no
    statistics on events (a young table; tenant_id right after migration 0016), 0016's policy was
    expected to let none through, and a source was read whole, then sorted, for the last seq an
    append takes (events_take_seq) and for the head and the next batch of every store's readers: a
    cost growing with the log, paid in every appending transaction. With 0023's policy, and the
    head as the last row rather than max(seq), each is a short range of the index (source, seq).
    Every statement's plan, nested ones included, as auto_explain reports it, as the service's role."""
    await append_noise(ledger.store, GLOBEX, NOISE_EVENTS)
    role = role_of(service_role_url)
    connection = await asyncpg.connect(database_url)
    plans: list[dict] = []
    try:
        await connection.execute("delete from pg_statistic where starelid = 'events'::regclass")
        await connection.execute(
            "load 'auto_explain'; set auto_explain.log_min_duration = 0; set auto_explain.log_analyze = on;"
            " set auto_explain.log_timing = off; set auto_explain.log_nested_statements = on;"
            " set auto_explain.log_format = json; set client_min_messages = log;"
            f" set role {role}; set giftcard.tenant = '*'"
        )
        connection.add_log_listener(lambda _, message: plans.append(message.message))
        store = EventStore(connection)
        with tenant_scope(ALL_TENANTS):
            head = await store.head(connection)
            near_head = type(head).of({source: seq - 2 for source, seq in head.seqs})
            assert len(await store.read_all(near_head, 100, connection=connection)) == 2 * len(head.seqs)
        await connection.execute(
            "set giftcard.tenant = 'globex';"
            " insert into events (stream_id, version, type, data, metadata, hash)"
            " values ('one-more', 1, 'test.Noise', '{}', '{}', '\\x00')"
        )
    finally:
        await connection.close()
    read = {}
    for message in plans:
        text = message[message.index("{") :]
        plan = json.loads(text)
        read[plan["Query Text"].strip()] = plan["Plan"]
    probes = {query: plan for query, plan in read.items() if query.startswith("select") and _scans_events(plan)}
    assert {_probe_kind(query) for query in probes} == {"append", "head", "batch"}, list(probes)
    for query, plan in probes.items():
        assert rows_examined(plan) <= ROWS_READ_MAX * len(head.seqs), (query, rows_examined(plan))
        # The append's probe reads its source's floor (event_seq_floors) in the same statement, by its key.
        assert indexes_used(plan) - {"event_seq_floors_pkey"} == {"events_source_order"}, (query, indexes_used(plan))


@pytest.mark.single_server("a shard's probe (on a worker) is EXECUTEd: its table's name is the shard's")
async def test_an_appends_probe_of_its_sources_last_seq_is_planned_once_per_connection(
    ledger,
    database_url,
    service_role_url,  # noqa: F811
):
    """Every appending transaction reads its sources' last seq (events_take_seq). Planned afresh at
    each append (EXECUTE), with the row-level security policy in the plan, that was up to a tenth of
    PostgreSQL's work per Debit; the connection now keeps one generic plan for it."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f"set role {role_of(service_role_url)}; set giftcard.tenant = 'globex'")
        for n in range(8):  # more than the five custom plans PostgreSQL tries before a generic one
            await connection.execute(
                "insert into events (stream_id, version, type, data, metadata, hash)"
                f" values ('planned-once-{n}', 1, 'test.Noise', '{{}}', '{{}}', '\\x00')"
            )
        await connection.execute("reset role")  # the view is a superuser's; the session's plans stay
        kept = await connection.fetch(
            "select name, ident from pg_backend_memory_contexts"
            " where name in ('CachedPlanSource', 'CachedPlan') and ident like 'select greatest(%from public.events%'"
        )
    finally:
        await connection.close()
    assert sorted(row["name"] for row in kept) == ["CachedPlan", "CachedPlanSource"], kept


def _scans_events(plan: dict) -> bool:
    return plan.get("Relation Name") == "events" or any(_scans_events(child) for child in plan.get("Plans", []))


def _probe_kind(query: str) -> str:
    if "from public.events" in query:
        return "append"  # events_take_seq's, in the insert's transaction
    return "head" if "seq desc limit 1" in query else "batch"


def role_of(url: str) -> str:
    return url.split("//", 1)[1].split("@", 1)[0].split(":", 1)[0]
