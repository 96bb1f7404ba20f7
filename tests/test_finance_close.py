"""Closing the month: the roll-forward, expiry, the journal, against a February worked out by hand.

The ledger below is written through the domain with the test's clock; every expected figure is
computed by hand in the comments, not by the code under test. The identities checked on top:
opening + movements = closing, closing = ``export liabilities``, journal debits = credits per
entry and in total.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from hub.http.state import LEDGER
from tests import page_dom
from tests.audit_ledgers import finance_cli
from tests.cards import issue
from tests.test_audit_pages import get

pytestmark = pytest.mark.also_on_citus


def at(day: str, hour: int = 12) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


async def write_february(ledger, clock) -> dict[str, str]:
    """Card A (USD): loaded 100.00 in January; in February loaded 50.00, a Debit of 30.00 settled 20.00
    then cancelled 15.00 (10.00 released, 5.00 refunded), the load cancelled 5.00: owes 130.00.
    Card C (USD, expires 2026-02-15T00:00Z): loaded 40.00, redeemed 15.00 in January (owes 25.00);
    a Debit of 5.00 on 10 February; expires with 20.00 left; the 5.00 Debit cancelled on 20 February
    (released after expiry: expires again at once). Card E (EUR), issued in February: loaded 80.00,
    a Debit of 12.34 still held at the close. After the period: A redeems 1.00, F (USD) is loaded."""
    money = ledger.create_transaction

    clock.now = at("2026-01-10")
    c = str((await issue(ledger, expiring_date=datetime(2026, 2, 15, tzinfo=UTC))).card.id)
    await money(c, operation="Credit", value=Decimal(40), description="load", request_id="c1")
    clock.now = at("2026-01-20")
    a = str((await issue(ledger, expiring_date=datetime(2027, 1, 1, tzinfo=UTC))).card.id)
    a_load = await money(a, operation="Credit", value=Decimal(100), description="load", request_id="a1")
    clock.now = at("2026-01-25")
    c_order = await money(c, operation="Debit", value=Decimal(15), description="order", request_id="c2")
    await ledger.settle(c, c_order.id, value=Decimal(15), request_id="c3")

    clock.now = at("2026-02-02")
    e = str((await issue(ledger, currency="EUR", expiring_date=datetime(2027, 1, 1, tzinfo=UTC))).card.id)
    await money(e, operation="Credit", value=Decimal(80), description="load", request_id="e1")
    await money(e, operation="Debit", value=Decimal("12.34"), description="order", request_id="e2")
    clock.now = at("2026-02-03")
    await money(a, operation="Credit", value=Decimal(50), description="top-up", request_id="a2")
    clock.now = at("2026-02-05")
    a_order = await money(a, operation="Debit", value=Decimal(30), description="order", request_id="a3")
    clock.now = at("2026-02-06")
    await ledger.settle(a, a_order.id, value=Decimal(20), request_id="a4")
    clock.now = at("2026-02-07")
    await ledger.cancel(a, a_order.id, value=Decimal(15), request_id="a5")
    clock.now = at("2026-02-08")
    await ledger.cancel(a, a_load.id, value=Decimal(5), request_id="a6")
    clock.now = at("2026-02-10")
    c_late = await money(c, operation="Debit", value=Decimal(5), description="order", request_id="c4")
    clock.now = at("2026-02-20")
    await ledger.cancel(c, c_late.id, value=Decimal(5), request_id="c5")

    clock.now = at("2026-03-02")
    f = str((await issue(ledger)).card.id)
    await money(f, operation="Credit", value=Decimal(10), description="load", request_id="f1")
    clock.now = at("2026-03-05")
    await money(a, operation="Debit", value=Decimal(1), description="order", request_id="a7")
    return {"A": a, "C": c, "E": e, "F": f}


# February, by hand. USD: A owed 100.00 and C 25.00 at the opening.
FEBRUARY_USD = {
    "opening": "125.00",  # 100.00 + 25.00
    "loaded": ("50.00", 1),  # A's top-up
    "load_cancelled": ("-5.00", 1),  # A's load cancelled 5.00
    "redeemed": ("-35.00", 2),  # A's Debit 30.00 + C's Debit 5.00
    "redemption_released": ("15.00", 2),  # A's cancel released 10.00 of its hold; C's 5.00 after expiry
    "redemption_refunded": ("5.00", 1),  # A's cancel refunded 5.00 of the 20.00 settled
    "expired_to_breakage": ("-25.00", 2),  # C: 25.00 - 5.00 = 20.00 at expiry, then the 5.00 released
    "expired_to_unclaimed_property": ("0.00", 0),
    "closing": "130.00",  # 125 + 50 - 5 - 35 + 15 + 5 - 25; A: 100 + 50 - 30 + 15 - 5; C: 0 (expired)
}
FEBRUARY_EUR = {
    "opening": "0.00",
    "loaded": ("80.00", 1),
    "load_cancelled": ("0.00", 0),
    "redeemed": ("-12.34", 1),
    "redemption_released": ("0.00", 0),
    "redemption_refunded": ("0.00", 0),
    "expired_to_breakage": ("0.00", 0),
    "expired_to_unclaimed_property": ("0.00", 0),
    "closing": "67.66",  # 80.00 - 12.34
}
MEMO = {
    "USD": {"cardsIssued": 0, "settled": Decimal("20.00"), "heldAtOpening": Decimal(0), "heldAtClosing": Decimal(0)},
    "EUR": {"cardsIssued": 1, "settled": Decimal(0), "heldAtOpening": Decimal(0), "heldAtClosing": Decimal("12.34")},
}


def as_table(rolled: dict) -> dict:
    table = {"opening": str(rolled["opening"]), "closing": str(rolled["closing"])}
    for line in rolled["movements"]:
        table[line["movement"]] = (str(line["amount"]), line["count"])
    return table


async def rollforward(database_url: str, tmp_path: Path, *args: str, env: dict | None = None) -> dict:
    output = tmp_path / "rollforward.json"
    code, out, err = await finance_cli(database_url, "finance", "rollforward", *args, "--json", str(output), env=env)
    assert code == 0, err
    assert "opening" in out and "closing" in out
    return json.loads(output.read_text(), parse_float=Decimal)


async def liabilities(database_url: str, day: str) -> dict[str, str]:
    code, out, err = await finance_cli(database_url, "export", "liabilities", "--as-of", day, "--json")
    assert code == 0, err
    return {t["currency"]: str(t["outstanding"]) for t in json.loads(out, parse_float=Decimal)["totals"]}


async def test_february_rolls_forward_as_worked_out_by_hand(ledger, clock, database_url, tmp_path):
    await write_february(ledger, clock)
    document = await rollforward(database_url, tmp_path, "--from", "2026-02-01", "--to", "2026-02-28")
    assert (document["opensAt"], document["closesAt"]) == ("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00")
    by_currency = {rolled["currency"]: rolled for rolled in document["currencies"]}
    assert as_table(by_currency["USD"]) == FEBRUARY_USD
    assert as_table(by_currency["EUR"]) == FEBRUARY_EUR
    assert {c: r["memo"] for c, r in by_currency.items()} == MEMO
    for rolled in by_currency.values():
        moved = sum(Decimal(str(line["amount"])) for line in rolled["movements"])
        assert Decimal(str(rolled["opening"])) + moved == Decimal(str(rolled["closing"]))

    # The closing is what export liabilities says at the end of the last day, the opening what it
    # says at the end of the day before the first.
    assert await liabilities(database_url, "2026-02-28") == {"USD": "130.00", "EUR": "67.66"}
    assert await liabilities(database_url, "2026-01-31") == {"USD": "125.00"}


async def test_an_expired_card_leaves_the_liability_at_its_expiry_instant(ledger, clock, database_url, tmp_path):
    cards = await write_february(ledger, clock)
    # C expires at 2026-02-15T00:00Z: still owed at the end of the 14th, not at the end of the 15th.
    assert await liabilities(database_url, "2026-02-14") == {"USD": "150.00", "EUR": "67.66"}  # A 130 + C 20
    assert await liabilities(database_url, "2026-02-15") == {"USD": "130.00", "EUR": "67.66"}
    document = await rollforward(database_url, tmp_path, "--from", "2026-02-15", "--to", "2026-02-15")
    usd = as_table(next(r for r in document["currencies"] if r["currency"] == "USD"))
    assert (usd["opening"], usd["expired_to_breakage"], usd["closing"]) == ("150.00", ("-20.00", 1), "130.00")

    code, out, err = await finance_cli(
        database_url, "export", "liabilities", "--as-of", "2026-02-28", "--output", str(tmp_path / "l.csv")
    )
    assert code == 0, err
    with (tmp_path / "l.csv").open(newline="") as file:
        assert cards["C"] not in {row["card_id"] for row in csv.DictReader(file)}


async def test_a_currency_can_send_expired_value_to_unclaimed_property(ledger, clock, database_url, tmp_path):
    await write_february(ledger, clock)
    config = tmp_path / "finance.toml"
    config.write_text('[expiry]\ndefault = "breakage"\ncurrencies = { USD = "unclaimed_property" }\n')
    env = {"GIFTCARD_FINANCE_CONFIG": str(config)}
    document = await rollforward(database_url, tmp_path, "--from", "2026-02-01", "--to", "2026-02-28", env=env)
    usd = as_table(next(r for r in document["currencies"] if r["currency"] == "USD"))
    assert usd == {
        **FEBRUARY_USD,
        "expired_to_breakage": ("0.00", 0),
        "expired_to_unclaimed_property": ("-25.00", 2),
    }

    config.write_text('[expiry]\ndefault = "forfeit"\n')
    code, _, err = await finance_cli(
        database_url, "finance", "rollforward", "--from", "2026-02-01", "--to", "2026-02-28", env=env
    )
    assert code == 2 and "expiry.default must be one of breakage, unclaimed_property" in err


async def test_the_journal_balances_per_entry_and_in_total(ledger, clock, database_url, tmp_path):
    cards = await write_february(ledger, clock)
    config = tmp_path / "finance.toml"
    config.write_text('[accounts]\nbreakage = "4900 Breakage revenue"\n')
    output = tmp_path / "journal.csv"
    code, out, err = await finance_cli(
        database_url,
        "finance", "journal", "--from", "2026-02-01", "--to", "2026-02-28", "--format", "csv", "--output", str(output),
        env={"GIFTCARD_FINANCE_CONFIG": str(config)},
    )  # fmt: skip
    assert code == 0, err
    with output.open(newline="", encoding="utf-8") as file:
        lines = list(csv.DictReader(file))
    # USD: 1 load, 1 load cancelled, 2 Debits, 2 releases, 1 refund, 2 expiries; EUR: 1 load, 1 Debit.
    assert len(lines) == 2 * 11 and "wrote 11 entries, 22 lines" in out

    def amount(line: dict, side: str) -> Decimal:
        return Decimal(line[side] or 0)

    entries: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        entries[line["entry_id"]].append(line)
        assert bool(line["debit"]) != bool(line["credit"]), line
    for entry_id, entry in entries.items():
        assert sum(amount(x, "debit") for x in entry) == sum(amount(x, "credit") for x in entry), entry_id
        assert len({(x["date"], x["currency"], x["card_id"], x["event_position"]) for x in entry}) == 1

    def net(account: str, currency: str) -> Decimal:
        """Credits less debits."""
        mine = [x for x in lines if x["account"] == account and x["currency"] == currency]
        return sum(amount(x, "credit") - amount(x, "debit") for x in mine)

    # The liability account moves by closing - opening: USD 130.00 - 125.00, EUR 67.66.
    assert (net("Gift card liability", "USD"), net("Gift card liability", "EUR")) == (Decimal("5.00"), Decimal("67.66"))
    assert net("4900 Breakage revenue", "USD") == Decimal("25.00")  # renamed by the file
    assert net("Cash or receivable", "USD") == Decimal("-45.00")  # 50.00 loaded, 5.00 given back
    # Redemptions (sales clearing): 35.00 redeemed less 15.00 released and 5.00 refunded.
    assert net("Gift card redemptions (sales clearing)", "USD") == Decimal("15.00")
    for currency in ("USD", "EUR"):
        mine = [x for x in lines if x["currency"] == currency]
        assert sum(amount(x, "debit") for x in mine) == sum(amount(x, "credit") for x in mine)
    expiries = [x for x in lines if x["movement"] == "expired_to_breakage" and x["card_id"] == cards["C"]]
    assert sorted(x["date"] for x in expiries) == ["2026-02-15T00:00:00+00:00"] * 2 + ["2026-02-20T12:00:00+00:00"] * 2
    assert cards["F"] not in {x["card_id"] for x in lines}

    jsonl = tmp_path / "journal.jsonl"
    code, _, err = await finance_cli(
        database_url, "finance", "journal", "--from", "2026-02-01", "--to", "2026-02-28", "--format", "jsonl",
        "--output", str(jsonl), env={"GIFTCARD_FINANCE_CONFIG": str(config)},
    )  # fmt: skip
    assert code == 0, err
    documents = [json.loads(line) for line in jsonl.read_text().splitlines()]
    as_text = [{k: "" if v is None else str(v) for k, v in d.items()} for d in documents]
    assert as_text == lines  # the same lines; amounts as exact decimal strings
    assert all(isinstance(d["debit"] or d["credit"], str) for d in documents)


async def test_bad_arguments_are_refused_before_reading(database_url, tmp_path):
    code, _, err = await finance_cli(
        database_url, "finance", "rollforward", "--from", "2026-02-10", "--to", "2026-02-01"
    )
    assert code == 2 and "--to must not be before --from" in err
    code, _, err = await finance_cli(database_url, "finance", "rollforward", "--from", "Feb", "--to", "2026-02-01")
    assert code == 2 and "not a date" in err
    code, _, err = await finance_cli(
        database_url, "finance", "journal", "--from", "2026-02-01", "--to", "2026-02-28", "--output", str(tmp_path / "j"),
        env={"GIFTCARD_FINANCE_CONFIG": str(tmp_path / "missing.toml")},
    )  # fmt: skip
    assert code == 2 and "cannot read" in err and not (tmp_path / "j").exists()


async def test_breakage_rate_and_recognition_from_the_ledgers_history(ledger, clock, database_url, tmp_path):
    await write_february(ledger, clock)
    output = tmp_path / "breakage.json"

    async def breakage(method: str) -> dict:
        args = ("finance", "breakage", "--as-of", "2026-02-28", "--method", method, "--json", str(output))
        code, out, err = await finance_cli(database_url, *args)
        assert code == 0, err
        assert "rate" in out
        document = json.loads(output.read_text(), parse_float=Decimal)
        return {c["currency"]: c for c in document["currencies"]}

    proportional = await breakage("proportional")
    usd, eur = proportional["USD"], proportional["EUR"]
    # Expired by then: C alone, loaded 40.00, 25.00 left on it (20.00 at expiry, 5.00 released after).
    assert usd["rateInputs"] == {"expiredCards": 1, "loadedOnExpiredCards": Decimal(40), "leftAtExpiry": Decimal(25)}
    assert usd["rate"] == Decimal("0.625")  # 25 / 40
    (january,) = usd["cohorts"]  # A and C were issued in January; F only in March
    # A, open: loaded 150.00 - 5.00 = 145.00, redeemed 30.00 - 10.00 - 5.00 = 15.00.
    # Expected breakage 145.00 x 0.625 = 90.625 -> 90.62 (half-even); expected redemptions 145.00 - 90.62 = 54.38;
    # recognised 90.62 x 15.00 / 54.38 = 24.9963... -> 25.00; with C's 25.00 at expiry: 50.00.
    assert (january["issued"], january["cards"], january["openLoaded"], january["openRedeemed"]) == (
        "2026-01",
        2,
        Decimal(145),
        Decimal(15),
    )
    assert (january["expectedBreakageOnOpen"], january["recognisedOnOpen"]) == (Decimal("90.62"), Decimal(25))
    assert usd["recognisedToDate"] == Decimal(50)
    assert (eur["rate"], eur["recognisedToDate"]) == (Decimal(0), Decimal(0))  # no EUR card has expired yet
    assert (await breakage("remote"))["USD"]["recognisedToDate"] == Decimal(25)  # only what expired


async def test_dormant_cards_with_their_last_shopper_activity(ledger, clock, database_url, tmp_path):
    await write_february(ledger, clock)
    clock.now = at("2024-01-10")
    g = str((await issue(ledger, expiring_date=datetime(2030, 1, 1, tzinfo=UTC))).card.id)
    await ledger.create_transaction(g, operation="Credit", value=Decimal(7), description="load", request_id="g1")
    clock.now = at("2024-01-11")
    order = await ledger.create_transaction(g, operation="Debit", value=Decimal(2), description="o", request_id="g2")
    clock.now = at("2025-06-01")
    await ledger.settle(g, order.id, value=Decimal(2), request_id="g3")  # the store's, not the shopper's

    output = tmp_path / "dormant.csv"
    args = ("finance", "dormant", "--as-of", "2026-02-28", "--years", "1", "--output", str(output))
    code, out, err = await finance_cli(database_url, *args)
    assert code == 0, err
    assert "since 2025-03-01T00:00:00+00:00" in out and "USD" in out and "5.00" in out
    with output.open(newline="") as file:
        rows = list(csv.DictReader(file))
    # G owes 7.00 - 2.00; A was used in February, C has expired and owes nothing, E is a month old.
    assert [(r["card_id"], r["currency"], r["owed"], r["last_activity_at"]) for r in rows] == [
        (g, "USD", "5.00", "2024-01-11T12:00:00+00:00")
    ]
    code, out, err = await finance_cli(database_url, "finance", "dormant", "--as-of", "2026-02-28", "--years", "3")
    assert code == 0 and "none" in out, err
    code, _, err = await finance_cli(database_url, "finance", "dormant", "--as-of", "2026-02-28", "--years", "0")
    assert code == 2 and "--years" in err


async def test_the_auditors_roll_forward_page_links_each_figure_to_its_movements(start_service, clock):
    pages = await start_service()
    cards = await write_february(pages.app[LEDGER], clock)
    status, _, _ = await get(pages, "/audit/rollforward?from=2026-02-01&to=2026-02-28", credentials=None)
    assert status == 401
    status, html, _ = await get(pages, "/audit/rollforward?from=2026-02-01&to=2026-02-28")
    assert status == 200, html
    document = page_dom.parse(html)
    usd = {
        row.fields()["line"]: row.fields()
        for row in page_dom.rows(document, "line")
        if row.attrs["data-currency"] == "USD"
    }
    assert usd["opening"]["amount"] == FEBRUARY_USD["opening"] and usd["closing"]["amount"] == FEBRUARY_USD["closing"]
    assert (usd["redeemed"]["amount"], usd["redeemed"]["count"]) == ("-35.00", "2")
    link = next(
        a.attrs["href"]
        for a in document.find_all(lambda n: n.tag == "a")
        if "movement=expired_to_breakage" in a.attrs.get("href", "") and "currency=USD" in a.attrs["href"]
    )

    status, html, _ = await get(pages, link)
    assert status == 200, html
    listing = page_dom.parse(html)
    assert listing.by_id("summary").fields() == {"count": "2", "total": "-25.00"}
    rows = [row.fields() for row in page_dom.rows(listing, "movement")]
    # C's 20.00 at its expiry instant, then the 5.00 released after it (each traced to its event).
    assert [(r["at"], r["card"], r["change"]) for r in rows] == [
        ("2026-02-15 00:00:00", cards["C"], "-20.00"),
        ("2026-02-20 12:00:00", cards["C"], "-5.00"),
    ]
    assert f'href="/audit/cards/{cards["C"]}"' in html
    assert rows[0]["version"] == "1"  # the expiry is traced to the issue, which carries the expiring date

    for query, named in [
        ("from=Feb&to=2026-02-28", "from must be a date"),
        ("from=2026-02-28&to=2026-02-01", "must not be before"),
        ("from=2026-02-01&to=2026-02-28&currency=USD&movement=stolen", "movement must be one of"),
        ("from=2026-02-01&to=2026-02-28&currency=XYZ&movement=redeemed", "XYZ"),
    ]:
        path = "/audit/rollforward" + ("/movements" if "movement=" in query else "") + "?" + query
        status, html, _ = await get(pages, path)
        assert status == 400 and named in html, (path, status)
