"""Many stores, as their callers reach them: addresses that carry the account, the account named by
the host or ``?an=``, and who may read whose audit (a tenant's key its own; an operator's any).

Two tenants over real loopback HTTP and ``giftcard`` subprocesses, the service and the command line
running as the role ``giftcard db grant`` sets up: a superuser passes through row-level security,
which is what keeps the tenants apart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from hub.http import auth
from tests import page_dom
from tests.conftest import HUB_KEY, HUB_TOKEN, services_on
from tests.giftcard_cli import giftcard
from tests.test_db_roles import service_role_url  # noqa: F401 (a fixture)
from tests.test_tenants import ACME, GLOBEX, Store, card_body, store_of

NATIVE = "VtexGiftCard"
HUB = "/api/giftcardproviders"
DOMAIN = "gift.test"
PROJECTED_TIMEOUT_S = 30.0
NOT_A_CARD = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
async def service(service_role_url, clock):  # noqa: F811
    async with services_on(service_role_url, clock=clock) as start:
        yield await start()


async def funded_card(store: Store, base: str, relation_name: str, value: int) -> dict:
    status, card = await store.call("POST", f"{base}/giftcards", card_body(relation_name))
    assert status == 200, card
    credit = {"operation": "Credit", "value": value, "description": "load", "requestId": f"load-{relation_name}"}
    status, ref = await store.call("POST", f"{base}/giftcards/{card['id']}/transactions", credit)
    assert status == 200, ref
    return {**card, "credit": ref}


# ---- links carry the account, and resolve ----------------------------------------------------------


async def test_a_tenants_links_carry_its_account_and_resolve_for_its_key_only(service, pool):
    acme, globex = await store_of(service, pool, ACME), await store_of(service, pool, GLOBEX)
    card = await funded_card(acme, "/native", "linked", 40)
    assert card["transactions"]["href"] == f"/acme/native/giftcards/{card['id']}/transactions"
    assert card["credit"]["_self"]["href"] == f"/acme/native/giftcards/{card['id']}/transactions/{card['credit']['id']}"
    status, detail = await acme.call("GET", card["credit"]["_self"]["href"])  # the href, requested back
    assert status == 200 and detail["value"] == 40
    for link in ("settlement", "cancellation", "authorization"):
        assert detail[link]["href"].startswith(f"/acme/native/giftcards/{card['id']}/transactions/")
        assert (await acme.call("GET", detail[link]["href"]))[0] == 200, link

    # The same card through the native Gift Card API and the hub: each surface's links, each resolving.
    status, got = await acme.call("GET", f"/api/giftcards/{card['id']}")
    assert status == 200 and got["transactions"]["href"] == f"/acme/api/giftcards/{card['id']}/transactions"
    assert (await acme.call("GET", got["transactions"]["href"]))[1][0]["id"] == card["credit"]["id"]
    status, through_hub = await acme.call("GET", f"{HUB}/{NATIVE}/giftcards/{card['id']}")
    assert status == 200 and through_hub["_self"]["href"] == f"/acme{HUB}/{NATIVE}/giftcards/{card['id']}"
    assert (await acme.call("GET", through_hub["_self"]["href"]))[1]["balance"] == 40

    # Another tenant's key never reaches it through the account's path: 403 naming both.
    status, body = await globex.call("GET", through_hub["_self"]["href"])
    assert status == 403 and body["error"]["code"] == "tenant_mismatch"
    assert "'acme'" in body["error"]["message"] and "'globex'" in body["error"]["message"]
    status, body = await globex.call("GET", f"/globex/native/giftcards/{card['id']}")
    assert status == 404, "its own account's path, and still not another's card"

    # The env pair is the default tenant's: today's links, unchanged.
    status, default_card, _ = await service.call("POST", "/native/giftcards", card_body("plain"))
    assert (
        status == 200 and default_card["transactions"]["href"] == f"/native/giftcards/{default_card['id']}/transactions"
    )


async def test_the_native_providers_service_url_carries_the_account_and_serves_that_tenant(service, pool):
    acme = await store_of(service, pool, ACME)
    status, providers = await acme.call("GET", HUB)
    native = providers[0]
    assert status == 200 and native["id"] == NATIVE
    assert native["serviceUrl"] == f"{service.base_url}/acme/native"
    assert native["_self"]["href"] == f"/acme{HUB}/{NATIVE}"
    assert (await acme.call("GET", native["_self"]["href"]))[1]["serviceUrl"] == native["serviceUrl"]
    _, default_listing, _ = await service.call("GET", HUB)
    assert default_listing[0]["serviceUrl"] == f"{service.base_url}/native"
    assert default_listing[0]["_self"]["href"] == f"{HUB}/{NATIVE}"

    # acme's native provider, registered in acme's hub as an external one at that serviceUrl with
    # acme's provider pair: the hub reaches it over HTTP, and the card is acme's.
    registration = {"serviceUrl": native["serviceUrl"], "appKey": acme.provider[0], "appToken": acme.provider[1]}
    status, registered = await acme.call("PUT", f"{HUB}/Loop", registration)
    assert status == 200, registered
    assert registered["_self"]["href"] == f"/acme{HUB}/Loop"
    status, card = await acme.call("POST", f"{HUB}/Loop/giftcards", card_body("looped"))
    assert status == 200, card
    assert card["_self"]["href"] == f"/acme{HUB}/Loop/giftcards/{card['id']}"
    assert (await acme.call("GET", f"/api/giftcards/{card['id']}"))[0] == 200, "issued in acme's ledger"
    assert (await service.call("GET", f"/api/giftcards/{card['id']}"))[0] == 404


async def test_a_batchs_links_carry_the_account(service, pool):
    acme = await store_of(service, pool, ACME)
    status, batch = await acme.call("POST", "/api/giftcards/_batches", {"count": 2, "value": 5})
    assert status == 200, batch
    for card in batch["cards"]:
        assert card["_self"]["href"] == f"/acme/api/giftcards/{card['id']}"
        status, got = await acme.call("GET", card["_self"]["href"])
        assert status == 200 and got["balance"] == 5


# ---- the account named by the host or ?an= ------------------------------------------------------------


async def test_an_names_the_account_only_where_configured(service_role_url, clock, pool):  # noqa: F811
    async with services_on(service_role_url, clock=clock) as start:
        plain = await start()
        resolving = await start(account_query=True)
        acme = await store_of(resolving, pool, ACME)
        card = await funded_card(acme, "/api", "an-named", 10)
        path = f"/api/giftcards/{card['id']}"
        assert (await acme.call("GET", f"{path}?an=acme"))[0] == 200
        for other in ("globex", "nosuch", "Not An Account"):
            status, body = await acme.call("GET", f"{path}?an={other}")
            assert status == 403 and body["error"]["code"] == "tenant_mismatch", other
            assert f"?an= names the account {other!r}" in body["error"]["message"]
        status, body = await acme.call("POST", f"{HUB}/{NATIVE}/giftcards/_search?an=globex", {"cart": {}})
        assert status == 403 and body["error"]["code"] == "tenant_mismatch", "a search, a POST, is held to it too"
        # Where it is not configured, ?an= is ignored, as before.
        plain_acme = Store(plain, acme.hub, acme.provider)
        assert (await plain_acme.call("GET", f"{path}?an=globex"))[0] == 200


async def test_the_host_names_the_account_under_the_configured_domain(service_role_url, clock, pool):  # noqa: F811
    async with services_on(service_role_url, clock=clock) as start:
        service = await start(account_host_domain=DOMAIN)
        acme = await store_of(service, pool, ACME)
        card = await funded_card(acme, "/native", "host-named", 10)
        path = f"/native/giftcards/{card['id']}"
        headers = {"X-PROVIDER-API-AppKey": acme.provider[0], "X-PROVIDER-API-AppToken": acme.provider[1]}

        async def status_at(host: str) -> tuple[int, dict | None]:
            status, body, _ = await service.call("GET", path, headers={**headers, "Host": host})
            return status, body

        assert (await status_at(f"acme.{DOMAIN}"))[0] == 200
        assert (await status_at(f"ACME.{DOMAIN}:8443"))[0] == 200, "host names are case-insensitive; the port is not"
        assert (await status_at("127.0.0.1"))[0] == 200, "a host outside the domain names no account"
        for host in (f"globex.{DOMAIN}", f"nosuch.{DOMAIN}"):
            status, body = await status_at(host)
            assert status == 403 and body["error"]["code"] == "tenant_mismatch", host
            assert "the host names the account" in body["error"]["message"]


# ---- whose audit a key reads ----------------------------------------------------------------------------


def basic(pair: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{pair[0]}:{pair[1]}".encode()).decode()}


async def page(service, path: str, pair: tuple[str, str]) -> tuple[int, str]:
    async with service.session.get(service.base_url + path, headers=basic(pair)) as response:
        return response.status, await response.text()


async def test_a_tenants_key_reads_only_its_own_audit_and_an_operators_any(service, pool):
    acme, globex = await store_of(service, pool, ACME), await store_of(service, pool, GLOBEX)
    acme_card = (await funded_card(acme, "/api", "audited", 25))["id"]
    audit = f"/api/audit/cards/{acme_card}"
    assert (await acme.call("GET", audit))[0] == 200
    assert (await acme.call("GET", f"{audit}?tenant=acme"))[0] == 200
    assert (await globex.call("GET", audit))[0] == 404, "another tenant's card is not there"
    status, body = await globex.call("GET", f"{audit}?tenant=acme")
    assert status == 403 and body["error"]["code"] == "tenant_mismatch" and "'acme'" in body["error"]["message"]

    operator = Store(service, await auth.create_key(pool, auth.HUB, (auth.VIEW,), operator=True), ("", ""))
    env_pair = Store(service, (HUB_KEY, HUB_TOKEN), ("", ""))
    await eventually_accepted(operator)
    for key in (operator, env_pair):
        status, body = await key.call("GET", audit)  # no tenant named: every tenant
        assert status == 200 and body["events"][-1]["balance"] == 25
        assert (await key.call("GET", f"{audit}?tenant=acme"))[0] == 200
        assert (await key.call("GET", f"{audit}?tenant=globex"))[0] == 404, "in globex's scope, not there"
        status, body = await key.call("GET", f"{audit}?tenant=nosuch")
        assert status == 404 and body["error"]["code"] == "tenant_not_found"
    status, body = await operator.call("GET", f"{audit}?tenant=Bad Name")
    assert status == 400 and "tenant must be a VTEX account name" in body["error"]["message"]
    # An operator's key is still its own tenant's on every other surface.
    assert (await operator.call("GET", f"/api/giftcards/{acme_card}"))[0] == 404

    # The auditor's pages: each tenant its own totals; the operator every tenant's, with a tenant column.
    await funded_card(globex, "/api", "audited", 7)
    await projected(acme)
    await projected(globex)
    status, html = await page(service, "/audit", acme.hub)
    document = page_dom.parse(html)
    assert status == 200 and document.by_id("coverage").text() == "Tenant acme."
    assert [row.attrs["data-tenant"] for row in page_dom.rows(document, "total")] == [ACME]
    status, html = await page(service, "/audit?tenant=acme", globex.hub)
    assert status == 403 and "'acme'" in html and "'globex'" in html
    status, html = await page(service, "/audit", operator.hub)
    document = page_dom.parse(html)
    assert status == 200 and document.by_id("coverage").text() == "Every tenant (an operator's view)."
    rows = page_dom.rows(document, "total")
    assert {row.fields()["tenant"] for row in rows} == {ACME, GLOBEX}
    links = {a.attrs["href"] for row in rows for a in row.find_all(lambda n: n.tag == "a")}
    assert links == {"/audit?tenant=acme", "/audit?tenant=globex"}, "each tenant's row opens its own view"
    status, html = await page(service, "/audit?tenant=globex", operator.hub)
    assert [row.attrs["data-tenant"] for row in page_dom.rows(page_dom.parse(html), "total")] == [GLOBEX]
    assert (await page(service, f"/audit/cards/{acme_card}", operator.hub))[0] == 200
    assert (await page(service, f"/audit/cards/{acme_card}", globex.hub))[0] == 404


async def eventually_accepted(store: Store) -> None:
    deadline = time.monotonic() + 2 * auth.KEY_REFRESH_S + 1
    while (await store.call("GET", "/api/giftcardproviders"))[0] != 200:
        assert time.monotonic() < deadline, "the new key is not accepted"
        await asyncio.sleep(0.1)


async def projected(store: Store) -> None:
    """The read models hold every event of ``store``'s tenant (its key sees the lag of its own)."""
    deadline = time.monotonic() + PROJECTED_TIMEOUT_S
    while True:
        status, body = await store.call("GET", "/api/projections")
        if status == 200 and all(item["lagEvents"] == 0 for item in body["items"]):
            return
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


# ---- the command line's --tenant --------------------------------------------------------------------------


async def test_exports_and_verify_cover_the_tenant_named_or_every_one(service, pool, service_role_url, tmp_path):  # noqa: F811
    acme, globex = await store_of(service, pool, ACME), await store_of(service, pool, GLOBEX)
    acme_cards = {(await funded_card(acme, "/native", f"a{n}", 10 + n))["id"] for n in range(3)}
    globex_cards = {(await funded_card(globex, "/native", "g", 100))["id"]}
    env = {"GIFTCARD_DATABASE_URL": service_role_url}

    async def export(*tenant: str) -> tuple[dict, set[str]]:
        output = tmp_path / f"export-{'-'.join(tenant) or 'all'}.jsonl"
        code, out, err = await giftcard(
            env, "export", "transactions", "--format", "jsonl", "--output", str(output), "--json", *tenant
        )
        assert code == 0, out + err
        return json.loads(out), {json.loads(line)["card_id"] for line in output.read_text().splitlines()}

    summary, cards = await export("--tenant", ACME)
    assert summary["tenants"] == [ACME] and cards == acme_cards
    summary, cards = await export("--tenant", GLOBEX)
    assert summary["tenants"] == [GLOBEX] and cards == globex_cards
    summary, cards = await export()
    assert summary["tenants"] == [ACME, "default", GLOBEX] and cards == acme_cards | globex_cards

    code, out, err = await giftcard(env, "export", "liabilities", "--as-of", "2026-01-15", "--tenant", GLOBEX)
    assert code == 0, out + err
    assert out.splitlines()[0] == "tenants: globex" and "100.00  over 1 card(s)" in out

    code, out, err = await giftcard(env, "audit", "verify", "--tenant", ACME, "--json")
    assert code == 0, out + err
    report = json.loads(out)
    acme_events = await pool.fetchval("select count(*) from events where tenant_id = $1", ACME)
    assert report["tenants"] == [ACME] and report["cards"] == 3 and report["events"] == acme_events
    code, out, err = await giftcard(env, "audit", "verify")
    assert code == 0, out + err
    assert "tenants: every tenant (3): acme, default, globex" in out

    # acme's page shows acme's run, globex's none; the operator's, the run over every tenant.
    status, html = await page(service, "/audit", acme.hub)
    assert page_dom.parse(html).by_id("verify-covered").text() == "over tenant acme"
    status, html = await page(service, "/audit", globex.hub)
    assert page_dom.parse(html).by_id("verify-verdict").text() == "never run"
    status, html = await page(service, "/audit", (HUB_KEY, HUB_TOKEN))
    assert page_dom.parse(html).by_id("verify-covered").text() == "over every tenant"


async def test_the_month_close_reports_cover_the_tenant_named_or_every_one(service, pool, service_role_url, tmp_path):  # noqa: F811
    acme, globex = await store_of(service, pool, ACME), await store_of(service, pool, GLOBEX)
    for n in range(3):
        await funded_card(acme, "/native", f"a{n}", 10 + n)
    await funded_card(globex, "/native", "g", 100)
    env = {"GIFTCARD_DATABASE_URL": service_role_url}
    period = ("--from", "2026-01-01", "--to", "2026-01-31")

    async def closing(*tenant: str) -> tuple[str, str]:
        code, out, err = await giftcard(env, "finance", "rollforward", *period, *tenant)
        assert code == 0, out + err
        return out.splitlines()[0], next(line.split()[-1] for line in out.splitlines() if " closing " in line)

    assert await closing("--tenant", ACME) == ("tenants: acme", "33.00")
    assert await closing("--tenant", GLOBEX) == ("tenants: globex", "100.00")
    assert await closing() == ("tenants: every tenant (3): acme, default, globex", "133.00")
    code, out, err = await giftcard(
        env, "finance", "dormant", "--as-of", "2026-01-31", "--years", "1", "--tenant", "nosuch"
    )
    assert code == 2 and "there is no tenant 'nosuch'" in err, out + err


async def test_tenant_is_refused_where_it_names_none_or_cannot_narrow(service_role_url, database_url):  # noqa: F811
    code, _, err = await giftcard({"GIFTCARD_DATABASE_URL": service_role_url}, "audit", "verify", "--tenant", "nosuch")
    assert code == 2 and "there is no tenant 'nosuch'" in err
    # As a superuser row-level security narrows nothing: every tenant's rows would pass as this one's.
    code, _, err = await giftcard({"GIFTCARD_DATABASE_URL": database_url}, "export", "liabilities", "--as-of",
                                  "2026-01-15", "--tenant", "default")  # fmt: skip
    assert code == 2 and "--tenant needs row-level security" in err and "bypasses it" in err


async def test_keys_create_operator(service, pool, service_role_url):  # noqa: F811
    code, out, err = await giftcard(
        {"GIFTCARD_DATABASE_URL": service_role_url}, "keys", "create", "--operator", "--role", "view"
    )
    assert code == 0, out + err
    pair = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    operator = Store(service, (pair["X-VTEX-API-AppKey"], pair["X-VTEX-API-AppToken"]), ("", ""))
    acme = await store_of(service, pool, ACME)
    card = (await funded_card(acme, "/api", "seen", 3))["id"]
    await eventually_accepted(operator)
    assert (await operator.call("GET", f"/api/audit/cards/{card}"))[0] == 200
    code, out, _ = await giftcard({"GIFTCARD_DATABASE_URL": service_role_url}, "keys", "list")
    assert any(pair["X-VTEX-API-AppKey"] in line and "(operator)" in line for line in out.splitlines())


async def test_an_operators_roll_forward_of_one_tenant_links_to_that_tenants_movements(service, pool):
    acme, globex = await store_of(service, pool, ACME), await store_of(service, pool, GLOBEX)
    acme_card = (await funded_card(acme, "/api", "rolled", 12))["id"]
    globex_card = (await funded_card(globex, "/api", "rolled", 99))["id"]
    period = "from=2026-01-15&to=2026-01-15"
    status, html = await page(service, f"/audit/rollforward?{period}&tenant=acme", (HUB_KEY, HUB_TOKEN))
    assert status == 200
    links = page_dom.parse(html).find_all(lambda n: n.tag == "a" and "movement=loaded" in n.attrs.get("href", ""))
    assert [link.attrs["href"] for link in links] == [
        f"/audit/rollforward/movements?{period}&tenant=acme&currency=USD&movement=loaded"
    ]
    status, html = await page(service, links[0].attrs["href"], (HUB_KEY, HUB_TOKEN))
    assert status == 200 and acme_card in html and globex_card not in html
    status, html = await page(service, f"/audit/rollforward/movements?{period}&currency=USD&movement=loaded",
                              (HUB_KEY, HUB_TOKEN))  # fmt: skip
    assert acme_card in html and globex_card in html, "naming no tenant, the operator reads every one"


async def test_an_operator_cannot_name_a_tenant_the_database_does_not_keep_apart(start_service, pool):
    service = await start_service()  # as a superuser, which row-level security lets through
    await auth.create_key(pool, auth.HUB, auth.ROLES, ACME)  # the tenant exists
    status, body, _ = await service.call("GET", f"/api/audit/cards/{NOT_A_CARD}?tenant=acme")
    assert status == 403 and body["error"]["code"] == "tenant_not_isolated" and "'acme'" in body["error"]["message"]
    status, body, _ = await service.call("GET", f"/api/audit/cards/{NOT_A_CARD}?tenant=default")
    assert status == 404 and body["error"]["code"] != "tenant_not_found", "its own default tenant it may name"
