"""The auditor's web view (``/audit``, ``/audit/cards/{id}``): HTTP Basic with hub-consumer pairs, data
escaped, and every number shown equal to the ledger: the balance after each event to the domain's
replay, the totals to ``audit verify``'s (``projections.exports.totals``) and to the cards' own balances.

Then the same pages in a real headless Chromium (Debian's ``chromium``; skipped without it): the
page loads, the chart is painted, the numbers match. Set ``GIFTCARD_TEST_SCREENSHOTS=DIR`` to keep
the screenshots for a person to look at.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import tempfile
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from hub.http import auth, openapi
from hub.http.state import LEDGER
from hub.pages import audit as audit_pages
from hub.pages.charts import value_ticks
from ledger.domain.giftcard import CREDIT, DEBIT
from ledger.domain.money import to_major
from projections.audit.auditors import audit_card, verify
from projections.audit.replay import CANCELLATION, SETTLEMENT, TRANSACTION
from projections.audit.verify_runs import latest_run
from projections.exports.totals import Totals, major
from tests import page_dom
from tests.audit_ledgers import (
    NATIVE,
    History,
    as_owner_bypassing_immutability,
    catch_up,
    finance_cli,
    write_forwarded,
    write_history,
)
from tests.conftest import HUB_KEY, HUB_TOKEN
from tests.png_pixels import count_near, rgb_pixels
from tests.subprocesses import output_within

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT_S = 90.0
SERIES_RGB = (0x25, 0x63, 0xEB)  # svg.chart .series stroke in hub/pages/templates/audit.css
HOSTILE_CAPTION = "<script>alert('caption')</script>"
HOSTILE_RELATION = '"><img src=x onerror=alert(1)>'
HOSTILE_REQUEST_ID = "<b onmouseover=alert(2)>req</b>"


@pytest.fixture
async def pages(start_service):
    return await start_service()


async def get(service, path: str, credentials: tuple[str, str] | None = (HUB_KEY, HUB_TOKEN), **headers: str):
    """(status, body text, headers) of a browser-like GET, with HTTP Basic credentials."""
    if credentials is not None:
        pair = f"{credentials[0]}:{credentials[1]}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    async with service.session.get(service.base_url + path, headers=headers, allow_redirects=False) as response:
        return response.status, await response.text(), response.headers


async def hostile_card(service) -> str:
    """A card made over HTTP, as a hub consumer would, with markup in every field it can carry."""
    status, card, _ = await service.call(
        "POST",
        "/api/giftcards",
        {
            "relationName": HOSTILE_RELATION,
            "caption": HOSTILE_CAPTION,
            "profileId": "p",
            "currencyCode": "USD",
            "expiringDate": "2030-01-01T00:00:00Z",
        },
        headers={"X-Request-Id": HOSTILE_REQUEST_ID},
    )
    assert status == 200, card
    for request_id, operation, value in (("load", "Credit", 250), ("pay", "Debit", "99.99")):
        status, body, _ = await service.call(
            "POST",
            f"/api/giftcards/{card['id']}/transactions",
            {"operation": operation, "value": value, "description": "<i>d</i>", "requestId": request_id},
        )
        assert status == 200, body
    return card["id"]


def exact(text: str) -> Decimal:
    """A figure as a page shows it (``1,234.50``, ``+100.00``) back to an exact decimal."""
    return Decimal(text.replace(",", "").replace("+", ""))


# ---- who may look ---------------------------------------------------------------------------------


async def test_pages_take_basic_credentials_with_the_view_role(start_service, pool):
    view_key, view_token = await auth.create_key(pool, auth.HUB, (auth.VIEW,))
    edit_key, edit_token = await auth.create_key(pool, auth.HUB, (auth.EDIT,))
    provider_key, provider_token = await auth.create_key(pool, auth.PROVIDER, (auth.VIEW,))
    service = await start_service()  # reads the stored keys as it starts

    for path in ("/audit", "/audit/cards/00000000-0000-0000-0000-000000000000"):
        status, body, headers = await get(service, path, credentials=None)
        assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="giftcard audit"')
        status, _, _ = await get(service, path, credentials=None, **service.headers("/api"))
        assert status == 401  # the API's headers are not what a browser sends; only Basic opens the pages
        status, body, headers = await get(service, path, credentials=(HUB_KEY, "not-the-token"))
        assert status == 403 and "not-the-token" not in body and "WWW-Authenticate" not in headers
        status, body, _ = await get(service, path, credentials=(edit_key, edit_token))
        assert status == 403 and edit_token not in body  # a key without the view role
        status, _, _ = await get(service, path, credentials=(provider_key, provider_token))
        assert status == 403  # the Provider Protocol's audience is not the hub's
        status, body, _ = await get(service, path, credentials=(view_key, view_token))
        assert status in (200, 404) and view_token not in body
    status, _, _ = await get(service, "/audit", credentials=None, Authorization="Basic !!not-base64!!")
    assert status == 403
    status, _, _ = await get(service, "/audit", credentials=None, Authorization="Bearer abc")
    assert status == 401


def test_chart_scales_are_round_numbers_of_whole_minor_units():
    assert value_ticks([0, 10000, 6950], "USD") == [0, 2500, 5000, 7500, 10000]
    assert value_ticks([0], "JPY") == [0, 1]  # a flat line at zero still gets a scale
    assert value_ticks([3], "USD") == [0, 1, 2, 3]  # never a fraction of a cent
    assert value_ticks([-2050, 7950], "USD") == [-2500, 0, 2500, 5000, 7500, 10000]  # a broken ledger shows below 0


async def test_every_page_route_is_documented():
    for route in audit_pages.routes():
        assert openapi.describe(route.method, route.path) is not None, route.path


# ---- a card's page ---------------------------------------------------------------------------------


async def test_a_card_page_shows_every_event_with_the_replayed_balance(pages, clock):
    ledger = pages.app[LEDGER]
    history = await write_history(ledger, clock)
    status, html, headers = await get(pages, f"/audit/cards/{history.usd}")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert (
        "script-src" not in headers["Content-Security-Policy"]
        and "default-src 'none'" in headers["Content-Security-Policy"]
    )
    document = page_dom.parse(html)
    await assert_card_page_matches_the_ledger(document, pages, history.usd)

    cells = [row.fields() for row in page_dom.rows(document, "event")]
    assert [(c["type"].split()[0], c["amount"], c["change"], c["balance"]) for c in cells] == [
        ("Issued", "", "0.00", "0.00"),
        ("Credited", "100.00", "+100.00", "100.00"),
        ("Debited", "30.50", "-30.50", "69.50"),
        ("Settled", "20.00", "0.00", "69.50"),
        ("Cancelled", "15.00", "+15.00", "84.50"),  # 10.50 released, 4.50 refunded
        ("Cancelled", "5.00", "-5.00", "79.50"),  # of the credit: it takes back
    ]
    assert "released 10.50, refunded 4.50" in cells[4]["type"]
    summary = document.by_id("summary").fields()
    assert summary["balance"] == "79.50 USD" and summary["authorized"] == "0.00 USD" and summary["status"] == "active"


async def test_a_card_page_as_of_an_instant_and_the_pages_that_say_no(pages, clock):
    history = await write_history(pages.app[LEDGER], clock)
    status, html, _ = await get(pages, f"/audit/cards/{history.usd}?asOf=2026-01-16T18:00:00Z")
    assert status == 200
    document = page_dom.parse(html)
    after = [
        row.attrs["data-version"] for row in page_dom.rows(document, "event") if "after-as-of" in row.attrs["class"]
    ]
    assert after == ["5", "6"]
    summary = document.by_id("summary").fields()
    assert (summary["balance"], summary["authorized"], summary["version"]) == ("69.50 USD", "10.50 USD", "4")

    status, html, _ = await get(pages, f"/audit/cards/{history.usd}?asOf=yesterday")
    assert status == 400 and "asOf" in page_dom.parse(html).by_id("error").text()
    status, html, headers = await get(pages, "/audit/cards/no-such-card")
    assert status == 404 and headers["Content-Type"].startswith("text/html") and "not found" in html
    status, _, headers = await get(pages, f"/audit/cards?card=+{history.usd}+")
    assert status == 303 and headers["Location"] == f"/audit/cards/{history.usd}"
    status, _, _ = await get(pages, "/audit/cards?card=")
    assert status == 400


async def test_data_is_escaped_never_markup(pages):
    card_id = await hostile_card(pages)
    status, html, _ = await get(pages, f"/audit/cards/{card_id}")
    assert status == 200
    assert "<script" not in html.lower() and "<img" not in html.lower() and "<b " not in html.lower()
    assert "&lt;script&gt;alert(&#x27;caption&#x27;)&lt;/script&gt;" in html
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    document = page_dom.parse(html)
    issued = page_dom.rows(document, "event")[0].fields()
    assert issued["actor"] == HUB_KEY and HOSTILE_REQUEST_ID in issued["caused-by"]  # shown, as text
    assert "route /api/giftcards" in issued["caused-by"]
    assert HUB_TOKEN not in html
    await assert_card_page_matches_the_ledger(document, pages, card_id)


async def assert_card_page_matches_the_ledger(document: page_dom.Node, service, card_id: str) -> None:
    """Each row's and chart point's balance is the domain replay's; the last is the ledger's own."""
    ledger = service.app[LEDGER]
    audit = await audit_card(ledger.store, card_id)
    replayed = [to_major(entry.step.balance, audit.currency) for entry in audit.entries]
    rows = page_dom.rows(document, "event")
    assert [int(row.attrs["data-version"]) for row in rows] == [entry.event.version for entry in audit.entries]
    assert [Decimal(row.attrs["data-balance"]) for row in rows] == replayed
    assert [exact(row.fields()["balance"]) for row in rows] == replayed
    assert replayed[-1] == to_major((await ledger.card(card_id)).balance, audit.currency)

    points = page_dom.chart_points(document, "balance-chart")
    assert len(points) == len(audit.entries) == int(document.by_id("balance-chart").attrs["data-points"])
    assert [Decimal(p.attrs["data-value"]) for p in points] == replayed
    # Drawn to scale: a larger balance is higher up (smaller y), an equal one at the same height.
    heights = {Decimal(p.attrs["data-value"]): float(p.attrs["cy"]) for p in points}
    ordered = sorted(heights)
    assert all(heights[a] > heights[b] for a, b in zip(ordered, ordered[1:], strict=False))
    line = page_dom.polyline_points(document, "balance-chart")
    assert len(line) == 2 * len(points) - 1  # a step line: each balance held until the next event


# ---- the overview ----------------------------------------------------------------------------------


async def test_overview_totals_equal_the_replay_and_the_cards_balances(pages, clock, pool, store):
    history = await write_history(pages.app[LEDGER], clock)
    await write_forwarded(store)
    await catch_up(pool)
    report = await verify(pool, NATIVE)
    assert report.ok

    status, html, _ = await get(pages, "/audit")
    assert status == 200
    document = page_dom.parse(html)
    await assert_overview_matches_the_ledger(document, pages, pool, history, report.totals)


async def assert_overview_matches_the_ledger(document, service, pool, history: History, totals: Totals) -> None:
    shown = {
        (row.attrs["data-provider"], row.attrs["data-currency"]): row.fields()
        for row in page_dom.rows(document, "total")
    }
    balances: defaultdict[str, int] = defaultdict(int)
    for card_id in (history.usd, history.jpy, history.bhd):
        card = await service.app[LEDGER].card(card_id)
        balances[card.currency] += card.balance
    for currency, held in balances.items():
        row = shown[(NATIVE, currency)]
        units = _units_by_kind(totals, NATIVE, currency)
        assert exact(row["loaded"]) == major(units[(TRANSACTION, CREDIT)], currency)
        assert exact(row["redeemed"]) == major(units[(TRANSACTION, DEBIT)], currency)
        assert exact(row["settled"]) == major(units[(SETTLEMENT, CREDIT)] + units[(SETTLEMENT, DEBIT)], currency)
        cancelled = units[(CANCELLATION, CREDIT)] + units[(CANCELLATION, DEBIT)]
        assert exact(row["cancelled"]) == major(cancelled, currency)
        assert (
            exact(row["liability"])
            == to_major(held, currency)
            == major(totals.balance_change(NATIVE)[currency], currency)
        )
        points = page_dom.chart_points(document, f"liability-{currency}")
        assert Decimal(points[-1].attrs["data-value"]) == to_major(held, currency)  # the chart ends where the ledger is
        first_day = await pool.fetchval(
            "select min(day) from read_daily_totals where provider = $1 and currency = $2", NATIVE, currency
        )
        last_day = await pool.fetchval("select max(day) from read_daily_totals")
        assert len(points) == (last_day - first_day).days + 1  # every day, quiet ones included
    acme = shown[("Acme", "")]
    acme_units = _units_by_kind(totals, "Acme", None)
    assert exact(acme["unclassified"]) == major(acme_units[(TRANSACTION, None)], None) == Decimal("40.5")
    assert exact(acme["settled"]) == Decimal(30) and exact(acme["cancelled"]) == Decimal("10.5")
    assert acme["liability"] == "-"  # an external provider's balances are its own


def _units_by_kind(totals: Totals, provider: str, currency: str | None) -> defaultdict[tuple, int]:
    units: defaultdict[tuple, int] = defaultdict(int)
    for key in totals.sorted_keys():
        if key.provider == provider and key.currency == currency:
            units[(key.kind, key.operation)] += totals.units(key)
    return units


async def test_overview_shows_the_last_audit_verify_run(pages, clock, pool, database_url):
    history = await write_history(pages.app[LEDGER], clock)
    status, html, _ = await get(pages, "/audit")
    assert page_dom.parse(html).by_id("verify-verdict").text() == "never run"
    assert "giftcard audit verify" in page_dom.parse(html).by_id("verify").text()

    code, out, err = await finance_cli(database_url, "audit", "verify", "--json")
    assert code == 0, out + err
    assert "recorded as verify run" in err
    document = page_dom.parse((await get(pages, "/audit"))[1])
    assert document.by_id("verify-verdict").text() == "all rules hold"
    run = await latest_run(pool)
    assert run is not None and run.ok and document.by_id("verify").attrs["data-run"] == str(run.id)
    shown = [exact(row.fields()["amount"]) for row in page_dom.rows(document, "verify-total")]
    assert shown == [total.amount for total in run.totals] and len(shown) >= 5
    replayed = (await verify(pool, NATIVE)).totals.render()
    assert [(t.kind, t.currency, t.count, t.amount) for t in run.totals] == [
        (t["kind"], t["currency"], t["count"], t["amount"]) for t in replayed
    ]  # kept exact: 12.345 BHD stays 12.345

    await as_owner_bypassing_immutability(
        pool,
        "update events set data = jsonb_set(data, '{value}', '1') where stream_id = $1 and version = 4",
        history.usd,
    )
    code, out, err = await finance_cli(database_url, "audit", "verify")
    assert code == 1, out + err
    document = page_dom.parse((await get(pages, "/audit"))[1])
    run = await latest_run(pool)
    assert run is not None and not run.ok
    assert document.by_id("verify-verdict").text() == f"{run.failures_total} failure(s)"
    failures = page_dom.rows(document, "verify-failure")
    assert failures and any(history.usd in row.text() and "hash_chain" in row.text() for row in failures)
    links = document.find_all(lambda n: n.tag == "a" and n.attrs.get("href") == f"/audit/cards/{history.usd}")
    assert links  # from the failure to the card's timeline


# ---- in a real browser -------------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium; .ci/run does)"
)


async def chromium(url: str, *mode: str) -> str:
    """Runs headless Chromium on ``url`` in a fresh profile; its stdout (the DOM with --dump-dom)."""
    profile = tempfile.mkdtemp(prefix="giftcard-chromium-")
    try:
        process = await asyncio.create_subprocess_exec(
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *mode,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await output_within(process, CHROMIUM_TIMEOUT_S)
        assert process.returncode == 0, stderr.decode()[-2000:]
        return stdout.decode()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def signed_in(service, path: str) -> str:
    """The page's URL with the credentials as userinfo: Chromium sends them as HTTP Basic."""
    return service.base_url.replace("http://", f"http://{HUB_KEY}:{HUB_TOKEN}@") + path


async def screenshot(service, path: str, name: str, tmp_path: Path) -> list[tuple[int, int, int]]:
    shot = tmp_path / name
    await chromium(signed_in(service, path), f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
    kept = os.environ.get("GIFTCARD_TEST_SCREENSHOTS")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(kept) / name)
    width, height, pixels = rgb_pixels(shot.read_bytes())
    assert (width, height) == (1280, 1600)
    return pixels


@needs_chromium
async def test_a_browser_loads_the_card_page_draws_its_chart_and_shows_the_ledgers_numbers(pages, clock, tmp_path):
    history = await write_history(pages.app[LEDGER], clock)
    hostile = await hostile_card(pages)

    dom = page_dom.parse(await chromium(signed_in(pages, f"/audit/cards/{history.usd}"), "--dump-dom"))
    await assert_card_page_matches_the_ledger(dom, pages, history.usd)
    dom = page_dom.parse(await chromium(signed_in(pages, f"/audit/cards/{hostile}"), "--dump-dom"))
    await assert_card_page_matches_the_ledger(dom, pages, hostile)
    assert not dom.find_all(lambda n: n.tag in ("script", "img"))  # the hostile caption stayed text
    assert HOSTILE_CAPTION in dom.find_all(lambda n: n.tag == "h1")[0].text()

    refused = await chromium(pages.base_url + f"/audit/cards/{history.usd}", "--dump-dom")
    assert page_dom.parse(refused).by_id("timeline") is None  # no credentials: Chromium gives up on the 401

    pixels = await screenshot(pages, f"/audit/cards/{history.usd}", "card.png", tmp_path)
    assert count_near(pixels, SERIES_RGB) > 1500  # the balance line and its points were painted


@needs_chromium
async def test_a_browser_loads_the_overview_with_the_ledgers_totals(pages, clock, pool, store, tmp_path, database_url):
    history = await write_history(pages.app[LEDGER], clock)
    await write_forwarded(store)
    await catch_up(pool)
    code, out, err = await finance_cli(database_url, "audit", "verify")
    assert code == 0, out + err
    report = await verify(pool, NATIVE)

    dom = page_dom.parse(await chromium(signed_in(pages, "/audit"), "--dump-dom"))
    await assert_overview_matches_the_ledger(dom, pages, pool, history, report.totals)
    assert dom.by_id("verify-verdict").text() == "all rules hold"
    pixels = await screenshot(pages, "/audit", "overview.png", tmp_path)
    assert count_near(pixels, SERIES_RGB) > 1000  # the liability lines were painted


async def issued_over_http(service, caption: str, relation: str) -> str:
    status, card, _ = await service.call(
        "POST",
        "/api/giftcards",
        {
            "relationName": relation,
            "caption": caption,
            "profileId": "p",
            "currencyCode": "USD",
            "expiringDate": "2030-01-01T00:00:00Z",
        },
    )
    assert status == 200, card
    return card["id"]


def tag_outline(document: page_dom.Node) -> list[tuple[str, str]]:
    """Each element's tag and id, in document order: what markup in the data would change."""
    return [(node.tag, node.attrs.get("id", "")) for node in document.walk()]


@needs_chromium
async def test_markup_written_into_a_card_stays_text_in_a_browser(pages):
    """Autoescape, proven where it matters: Chromium parses the page of a card whose caption and relation
    carry a script, an attribute breakout and an element, and builds the same elements as for a plain card."""
    caption, relation = '<script>document.title="pwned"</script>', '" autofocus onfocus="alert(1)'
    hostile = await issued_over_http(pages, caption, relation)
    plain = await issued_over_http(pages, "Plain caption", "plain relation")

    status, html, _ = await get(pages, f"/audit/cards/{hostile}")
    assert status == 200
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in html
    assert "&quot; autofocus onfocus=&quot;alert(1)" in html

    dom = page_dom.parse(await chromium(signed_in(pages, f"/audit/cards/{hostile}"), "--dump-dom"))
    plain_dom = page_dom.parse(await chromium(signed_in(pages, f"/audit/cards/{plain}"), "--dump-dom"))
    assert tag_outline(dom) == tag_outline(plain_dom)  # nothing injected: no script, no new element
    assert not any("onfocus" in node.attrs or "autofocus" in node.attrs for node in dom.walk())
    assert dom.find_all(lambda n: n.tag == "title")[0].text() == f"Card {hostile} · Audit"  # no script ran
    assert dom.find_all(lambda n: n.tag == "h1")[0].text().startswith(caption)
    assert dom.find_all(lambda n: n.tag == "strong")[0].text() == relation
