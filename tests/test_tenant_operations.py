"""Operating the stores from the command line (issue 23, items 7 and 8): ``giftcard tenants create |
list | set | suspend | resume | export | delete`` as real subprocesses, and what the service answers
meanwhile over real HTTP: a suspended store is refused on every surface and keeps its data; an export
holds one store only and verifies on its own; a removal takes a suspension and a retention, every row
of the store, and nothing of another.

The service runs as the role ``giftcard db grant`` sets up (as in tests/test_tenants.py): a superuser
would serve the default tenant only. The command line runs as the tests' own role, the schema's owner.
"""

from __future__ import annotations

import base64
import csv
import getpass
import json
import uuid
from pathlib import Path

import asyncpg
import pytest

from ledger.eventstore.store import EventStore, NewEvent
from ledger.postgres.database import database_named
from ledger.postgres.tenancy import ALL_TENANTS, tenant_scope
from ledger.postgres.tenants import TENANT_TABLES
from tests.conftest import TEMPLATE_DB
from tests.giftcard_cli import giftcard
from tests.test_db_roles import service_role_url  # noqa: F401 (a fixture)
from tests.test_security import eventually
from tests.test_tenants import GLOBEX, Store, card_body, issue_in, service, store_of  # noqa: F401 (a fixture)

ACME = "acme"
PROVIDER_TOKEN_SENT = "acme-provider-token-in-clear"
CARD_PATH = "/api/giftcards/{}"


def env_of(database_url: str) -> dict[str, str]:
    return {"GIFTCARD_DATABASE_URL": database_url}


def pairs_printed(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if line.startswith("X-"))


async def log_of(pool: asyncpg.Pool, account: str) -> list[asyncpg.Record]:
    return await pool.fetch("select act, actor, detail from tenant_log where account = $1 order by id", account)


async def rows_of(pool: asyncpg.Pool, account: str) -> dict[str, int]:
    """Rows of ``account`` in every table of tenant data, as the operator sees them."""
    with tenant_scope(ALL_TENANTS):
        return {
            table: await pool.fetchval(f"select count(*) from {table} where tenant_id = $1", account)
            for table in TENANT_TABLES
        }


def test_the_tables_removed_are_every_table_that_holds_a_tenant():
    """Checked against the schema itself in the next test: this one only guards the list's shape."""
    assert len(set(TENANT_TABLES)) == len(TENANT_TABLES) and "events" in TENANT_TABLES


async def test_tenant_tables_are_exactly_the_tables_with_a_tenant_column(pool):
    tables = await pool.fetch(
        "select table_name from information_schema.columns where table_schema = 'public' and column_name = 'tenant_id'"
    )
    assert {r["table_name"] for r in tables} == set(TENANT_TABLES), "a new table of tenant data must be removed too"


# ---- create, list, set --------------------------------------------------------------------------


async def test_create_prints_a_hub_and_a_provider_pair_that_work_and_logs_it(service, pool, database_url):  # noqa: F811
    code, out, err = await giftcard(env_of(database_url), "tenants", "create", ACME, "--max-rps", "50")
    assert code == 0, err[-2000:]
    printed = pairs_printed(out)
    assert set(printed) == {
        "X-VTEX-API-AppKey",
        "X-VTEX-API-AppToken",
        "X-PROVIDER-API-AppKey",
        "X-PROVIDER-API-AppToken",
    }
    hub = (printed["X-VTEX-API-AppKey"], printed["X-VTEX-API-AppToken"])
    provider = (printed["X-PROVIDER-API-AppKey"], printed["X-PROVIDER-API-AppToken"])
    store = Store(service, hub, provider)
    await eventually(lambda: _status_is(store, "GET", CARD_PATH.format(uuid.uuid4()), 404))
    status, card = await store.call("POST", "/native/giftcards", card_body("first"))
    assert status == 200, card
    assert (await store.call("GET", CARD_PATH.format(card["id"])))[0] == 200, (
        "the hub pair reads what the provider's made"
    )
    tenant = await pool.fetchrow("select max_rps, max_concurrent, suspended_at from tenants where account = $1", ACME)
    assert (tenant["max_rps"], tenant["max_concurrent"], tenant["suspended_at"]) == (50, None, None)
    [created] = await log_of(pool, ACME)
    assert (created["act"], created["actor"], json.loads(created["detail"])) == (
        "created",
        getpass.getuser(),
        {"max_rps": 50},
    )
    assert printed["X-VTEX-API-AppToken"] not in created["detail"], "a token is shown once, never logged"

    code, out, err = await giftcard(env_of(database_url), "tenants", "create", ACME)
    assert (code, out) == (1, "") and f"tenant {ACME!r} already exists" in err
    code, _, err = await giftcard(env_of(database_url), "tenants", "create", "Not-An-Account")
    assert code == 2 and "'Not-An-Account' is not a VTEX account name" in err
    code, _, err = await giftcard(env_of(database_url), "tenants", "create", "x1", "--max-rps", "0")
    assert code == 2 and "--max-rps" in err
    assert await pool.fetchval("select count(*) from tenants where account = 'x1'") == 0


async def _key_refused(store: Store) -> bool:
    return await store.call("GET", "/api/giftcardproviders") == (403, None)


async def _status_is(store: Store, method: str, path: str, status: int) -> bool:
    return (await store.call(method, path))[0] == status


async def test_list_and_set_limits(pool, database_url, ledger):
    env = env_of(database_url)
    assert (await giftcard(env, "tenants", "create", ACME, "--max-concurrent", "8"))[0] == 0
    await issue_in(ledger, ACME, "one")
    code, out, err = await giftcard(env, "tenants", "set", ACME, "--max-rps", "20", "--max-concurrent", "none")
    assert code == 0 and "max rps 20, max concurrent -" in out, err[-2000:]
    assert tuple(await pool.fetchrow("select max_rps, max_concurrent from tenants where account = $1", ACME)) == (
        20,
        None,
    )
    code, out, _ = await giftcard(env, "tenants", "list")
    assert code == 0
    line = next(line.split() for line in out.splitlines() if line.startswith(ACME + " "))
    assert line[1] == "active" and line[4:7] == ["20", "-", "1"], line  # limits, then its one card
    assert (await giftcard(env, "tenants", "set", ACME))[0] == 2, "nothing to set"
    code, _, err = await giftcard(env, "tenants", "set", "nobody", "--max-rps", "1")
    assert code == 2 and "no tenant 'nobody'" in err
    acts = [(r["act"], json.loads(r["detail"])) for r in await log_of(pool, ACME)]
    assert acts == [("created", {"max_concurrent": 8}), ("limits_set", {"max_rps": 20, "max_concurrent": None})]


# ---- suspend and resume -------------------------------------------------------------------------


async def test_a_suspended_tenant_is_refused_on_every_surface_and_keeps_its_data(service, pool, database_url):  # noqa: F811
    acme, globex = await store_of(service, pool, ACME), await store_of(service, pool, GLOBEX)
    status, card = await acme.call("POST", "/api/giftcards", card_body("kept"))
    assert status == 200, card
    env = env_of(database_url)
    code, out, err = await giftcard(env, "tenants", "suspend", ACME)
    assert code == 0 and "may be deleted from" in out, err[-2000:]
    suspended_at, delete_after = await pool.fetchrow(
        "select suspended_at, delete_after from tenants where account = $1", ACME
    )
    assert (delete_after - suspended_at).days == 30, "GIFTCARD_TENANT_RETENTION_DAYS' default"

    surfaces = [
        ("GET", CARD_PATH.format(card["id"])),  # /api/giftcards
        ("GET", f"/native/giftcards/{card['id']}"),  # the Provider Protocol
        ("POST", "/native/giftcards", card_body("new")),
        ("GET", "/api/giftcardproviders"),  # the hub
        ("GET", f"/api/audit/cards/{card['id']}"),  # the auditor's API
        ("GET", "/api/ledger/balances"),  # the read API
    ]

    async def refused() -> bool:
        return (await acme.call("GET", CARD_PATH.format(card["id"])))[0] == 403

    await eventually(refused)
    for method, path, *body in surfaces:
        status, answer = await acme.call(method, path, *body)
        assert status == 403 and answer["error"]["code"] == "tenant_suspended", (path, status, answer)
        assert ACME in answer["error"]["message"]
    status, page = await audit_page(service, acme.hub)
    assert status == 403 and page["error"]["code"] == "tenant_suspended"
    assert (await globex.call("GET", "/api/giftcardproviders"))[0] == 200, "another store is served"
    assert (await audit_page(service, globex.hub))[0] == 200
    with tenant_scope(ALL_TENANTS):
        assert await pool.fetchval("select count(*) from card_lookup where card_id = $1", card["id"]) == 1

    code, out, err = await giftcard(env, "tenants", "resume", ACME)
    assert code == 0, err[-2000:]
    await eventually(lambda: _status_is(acme, "GET", CARD_PATH.format(card["id"]), 200))
    assert (await audit_page(service, acme.hub))[0] == 200
    assert [r["act"] for r in await log_of(pool, ACME)] == ["suspended", "resumed"]
    code, _, err = await giftcard(env, "tenants", "resume", ACME)
    assert code == 1 and "is not suspended" in err


async def audit_page(on, pair: tuple[str, str]):
    """The auditor's overview page, signed in with a hub pair as a browser does (HTTP Basic)."""
    basic = base64.b64encode(f"{pair[0]}:{pair[1]}".encode()).decode()
    async with on.session.get(on.base_url + "/audit", headers={"Authorization": f"Basic {basic}"}) as answer:
        body = await answer.read()
        return answer.status, (json.loads(body) if answer.content_type == "application/json" else None)


# ---- export ---------------------------------------------------------------------------------------


async def two_stores_with_everything(service, pool) -> tuple[Store, Store, dict[str, str]]:  # noqa: F811
    """acme and globex, each with a card loaded and debited, a provider and a webhook subscription;
    the ids and secrets of acme's that an export of globex must not hold."""
    stores = {ACME: await store_of(service, pool, ACME), GLOBEX: await store_of(service, pool, GLOBEX)}
    seen = {}
    for account, store in stores.items():
        status, card = await store.call("POST", "/api/giftcards", card_body("same-name"))
        assert status == 200, card
        for operation, value in (("Credit", 30), ("Debit", 12.5)):
            move = {"operation": operation, "value": value, "description": "d", "requestId": operation}
            assert (await store.call("POST", f"{CARD_PATH.format(card['id'])}/transactions", move))[0] == 200
        provider = {"serviceUrl": "http://127.0.0.1:9/v1", "appKey": "k", "appToken": PROVIDER_TOKEN_SENT}
        assert (await store.call("PUT", "/api/giftcardproviders/Ext", provider))[0] == 200
        status, hook = await store.call("POST", "/api/webhooks", {"url": "http://127.0.0.1:9/hook"})
        assert status == 200, hook
        seen[account] = {"card": card["id"], "secret": hook["secret"], "hook": hook["id"]}
    return stores[ACME], stores[GLOBEX], seen


async def test_an_export_holds_its_tenant_only_and_verifies_on_its_own(
    service,  # noqa: F811
    pool,
    database_url,
    server_url,
    tmp_path,
):  # noqa: F811
    _, _, seen = await two_stores_with_everything(service, pool)
    folder = tmp_path / "acme-export"
    env = env_of(database_url)
    code, out, err = await giftcard(env, "tenants", "export", ACME, "--output", str(folder))
    assert code == 0, err[-2000:]
    assert f"giftcard audit verify --from {folder}" in out
    assert folder.stat().st_mode & 0o077 == 0, "the owner's only"

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["account"] == ACME and set(manifest["files"]) == {
        *(f"{table}.csv" for table in TENANT_TABLES),
        "tenant.csv",
        "tenant_log.csv",
    }
    events = manifest["files"]["events.csv"]["rows"]
    assert events == 4 and manifest["files"]["card_lookup.csv"]["rows"] == 1
    assert (
        manifest["files"]["providers.csv"]["rows"] == 1 and manifest["files"]["webhook_subscriptions.csv"]["rows"] == 1
    )
    everything = "".join(path.read_text() for path in folder.iterdir())
    assert seen[ACME]["card"] in everything
    for other in seen[GLOBEX].values():
        assert other not in everything, "nothing of another store"
    assert GLOBEX not in everything
    for secret in (PROVIDER_TOKEN_SENT, seen[ACME]["secret"]):
        assert secret not in everything, "secrets stay sealed"
    for path in folder.glob("*.csv"):
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
        assert len(rows) == manifest["files"][path.name]["rows"], path.name
        assert all((row.get("tenant_id") or row.get("account")) == ACME for row in rows), path.name
    assert [r["act"] for r in await log_of(pool, ACME)][-1] == "exported"

    code, out, err = await giftcard({}, "audit", "verify", "--from", str(folder))
    assert code == 0 and f"verified {events} event(s)" in out and "of tenant acme" in out and "all hold" in out, (
        out + err
    )[-2000:]

    assert await rows_restored(server_url, folder) == await rows_of(pool, ACME), "the files load back with COPY"

    tamper_one_amount(folder / "events.csv", seen[ACME]["card"])
    code, out, _ = await giftcard({}, "audit", "verify", "--from", str(folder))
    assert code == 1
    assert f"FAIL {seen[ACME]['card']} version 2" in out and "hash_chain" in out, out[-2000:]
    assert "export_file_unchanged: events.csv differs" in out

    code, _, err = await giftcard(env, "tenants", "export", ACME, "--output", str(folder))
    assert code == 2 and "is not an empty folder" in err
    code, _, err = await giftcard(env, "tenants", "export", "nobody", "--output", str(tmp_path / "n"))
    assert code == 2 and "no tenant 'nobody'" in err and not (tmp_path / "n").exists()


async def rows_restored(server_url: str, folder: Path) -> dict[str, int]:
    """Loads an export into a new database of the same schema, as ``\\copy … csv header`` would, and
    counts the tenant's rows there (the database is dropped after)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"create database {name} template {TEMPLATE_DB}")
        connection = await asyncpg.connect(database_named(server_url, name))
        try:
            await connection.copy_to_table("tenants", source=folder / "tenant.csv", format="csv", header=True)
            for table in reversed(TENANT_TABLES):  # the tables referred to first
                await connection.copy_to_table(table, source=folder / f"{table}.csv", format="csv", header=True)
            return {table: await connection.fetchval(f"select count(*) from {table}") for table in TENANT_TABLES}
        finally:
            await connection.close()
    finally:
        await admin.execute(f"drop database if exists {name} with (force)")
        await admin.close()


def tamper_one_amount(path: Path, card_id: str) -> None:
    """The card's Credit (its version 2) says 31 where 30 was loaded; the line keeps its stored hash."""
    with path.open(newline="") as file:
        rows = list(csv.reader(file))
    header = rows[0]
    stream, version, data = header.index("stream_id"), header.index("version"), header.index("data")
    [row] = [r for r in rows[1:] if r[stream] == card_id and r[version] == "2"]
    assert '"value": 3000' in row[data], row[data]
    row[data] = row[data].replace('"value": 3000', '"value": 3100')
    with path.open("w", newline="") as file:
        csv.writer(file, lineterminator="\n").writerows(rows)


# ---- delete ---------------------------------------------------------------------------------------


async def test_delete_takes_a_suspension_and_its_retention_then_every_row_and_nothing_else(
    service,  # noqa: F811
    pool,
    database_url,
):
    acme, globex, _ = await two_stores_with_everything(service, pool)
    env = env_of(database_url)
    assert (await giftcard(env, "projections", "run", "--once"))[0] == 0  # read models of both stores
    before = await rows_of(pool, GLOBEX)
    acme_rows = await rows_of(pool, ACME)
    assert acme_rows["events"] and acme_rows["read_card_balances"] and acme_rows["api_keys"]

    code, _, err = await giftcard(env, "tenants", "delete", ACME, "--yes")
    assert code == 1 and "is not suspended: suspend it first" in err
    assert (await giftcard(env, "tenants", "suspend", ACME))[0] == 0
    code, _, err = await giftcard(env, "tenants", "delete", ACME, "--yes")
    delete_after = await pool.fetchval("select delete_after from tenants where account = $1", ACME)
    assert code == 1 and f"may be deleted from {delete_after:%Y-%m-%d %H:%M:%S} UTC on" in err
    code, _, err = await giftcard(env, "tenants", "delete", ACME)
    assert code == 1 and "pass --yes" in err
    code, _, err = await giftcard(env, "tenants", "delete", "default", "--yes")
    assert code == 1 and "is the default tenant (GIFTCARD_DEFAULT_TENANT)" in err
    assert await rows_of(pool, ACME) == acme_rows, "nothing removed by a refusal"

    assert (await giftcard(env, "tenants", "suspend", ACME, "--retention-days", "0"))[0] == 0
    code, out, err = await giftcard(env, "tenants", "delete", ACME, "--yes")
    assert code == 0, err[-2000:]
    assert await rows_of(pool, ACME) == dict.fromkeys(TENANT_TABLES, 0)
    assert await rows_of(pool, GLOBEX) == before, "another store keeps every row"
    assert await pool.fetchval("select deleted_at is not null from tenants where account = $1", ACME)
    deleted = (await log_of(pool, ACME))[-1]
    assert deleted["act"] == "deleted" and json.loads(deleted["detail"])["rows_removed"] == acme_rows
    assert f"{sum(acme_rows.values())} row(s) removed" in out

    code, out, err = await giftcard(env, "audit", "verify")
    assert code == 0 and "all hold" in out, (out + err)[-3000:]
    await eventually(lambda: _key_refused(acme))  # its keys are gone: 403 with no body, as for any wrong key
    assert (await globex.call("GET", "/api/giftcardproviders"))[0] == 200
    code, out, err = await giftcard(env, "tenants", "list")
    assert any(line.split()[:2] == [ACME, "deleted"] for line in out.splitlines()), out
    for command in (("keys", "create", "--tenant", ACME), ("tenants", "create", ACME), ("tenants", "resume", ACME)):
        code, _, err = await giftcard(env, *command)
        assert code == 1 and f"tenant {ACME!r} was deleted" in err, (command, err[-2000:])


async def test_the_services_role_cannot_remove_a_tenant(pool, ledger, database_url, service_role_url):  # noqa: F811
    await pool.execute("insert into tenants (account) values ($1)", GLOBEX)
    await issue_in(ledger, GLOBEX, "kept")
    assert (await giftcard(env_of(database_url), "tenants", "suspend", GLOBEX, "--retention-days", "0"))[0] == 0
    before = await rows_of(pool, GLOBEX)
    code, _, err = await giftcard(env_of(service_role_url), "tenants", "delete", GLOBEX, "--yes")
    assert code == 1 and "nothing deleted: permission denied for table events" in err, err[-2000:]
    assert "as the schema's owner" in err
    assert await rows_of(pool, GLOBEX) == before
    assert await pool.fetchval("select deleted_at from tenants where account = $1", GLOBEX) is None


async def test_events_are_deleted_only_by_the_removal_of_a_tenant_past_its_retention(pool, ledger):
    await pool.execute("insert into tenants (account) values ($1)", GLOBEX)
    await issue_in(ledger, GLOBEX, "kept")
    async with pool.acquire() as connection:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="events are immutable"):
            await connection.execute("delete from events where tenant_id = $1", GLOBEX)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="events are immutable"):
            await removing(connection, GLOBEX)  # not suspended
        await connection.execute(
            "update tenants set suspended_at = now(), delete_after = now() + interval '1 day' where account = $1",
            GLOBEX,
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="events are immutable"):
            await removing(connection, GLOBEX)  # its retention has not passed
        await connection.execute("update tenants set delete_after = now() where account = $1", GLOBEX)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="events are immutable"):
            await removing(connection, ACME, GLOBEX)  # the session names another tenant
    assert await pool.fetchval("select count(*) from events where tenant_id = $1", GLOBEX) > 0
    async with pool.acquire() as connection:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="events are immutable: UPDATE"):
            await connection.execute("update events set version = version where tenant_id = $1", GLOBEX)
        await removing(connection, GLOBEX)  # the one way through
    assert await pool.fetchval("select count(*) from events where tenant_id = $1", GLOBEX) == 0


async def removing(connection: asyncpg.Connection, named: str, tenant: str | None = None) -> None:
    """Deletes ``tenant``'s events (``named``'s by default) in a session that names ``named`` for removal."""
    async with connection.transaction():
        await connection.execute("select set_config('giftcard.removing_tenant', $1, true)", named)
        await connection.execute("delete from events where tenant_id = $1", tenant or named)


async def test_a_removal_never_lets_a_later_event_take_a_seq_already_read(pool, ledger, database_url):
    """Where the removed store's events were a source's last, the next event still goes above them:
    a projection standing past them would otherwise never read it."""
    await pool.execute("insert into tenants (account) values ($1), ($2)", ACME, GLOBEX)
    for i in range(8):
        await issue_in(ledger, ACME, f"a{i}")
        await issue_in(ledger, GLOBEX, f"g{i}")
    with tenant_scope(ALL_TENANTS):
        tops = await pool.fetch(
            """
            select distinct on (source) source, seq, tenant_id from events order by source, seq desc
            """
        )
    source, removed_seq = next((r["source"], r["seq"]) for r in tops if r["tenant_id"] == GLOBEX)
    env = env_of(database_url)
    assert (await giftcard(env, "tenants", "suspend", GLOBEX, "--retention-days", "0"))[0] == 0
    assert (await giftcard(env, "tenants", "delete", GLOBEX, "--yes"))[0] == 0
    stream_id = await stream_in_source(pool, source)
    with tenant_scope(ACME):
        await EventStore(pool).append(stream_id, 0, [NewEvent("test.Noted", b"{}")])
        seq = await pool.fetchval("select seq from events where stream_id = $1", stream_id)
    assert seq > removed_seq


async def stream_in_source(pool: asyncpg.Pool, source: int) -> str:
    while True:
        stream_id = f"note-{uuid.uuid4()}"
        if await pool.fetchval("select event_lane($1)", stream_id) == source:
            return stream_id
