"""Bulk issuance: every card's code written once and valid, no code in clear in the database,
the same events as cards issued one by one, resumable after SIGKILL without duplicates or lost
codes, and the HTTP endpoint's all-or-nothing answers and retries."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import sys
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from hub.http import auth, bulk_api, openapi
from hub.http.state import LEDGER
from ledger.application import codes_file
from ledger.application.bulk_issue import (
    BatchBusy,
    BatchDefaults,
    BatchRequest,
    BatchTerms,
    BatchTermsMismatch,
    BulkIssuer,
    in_card_order,
    lock_key,
    relation_name,
    resolve_terms,
)
from ledger.application.codes_file import CodesFileRefused
from ledger.application.commands import Ledger
from ledger.domain import errors
from ledger.domain.codes import hash_code, normalize_code
from ledger.eventstore.store import EventStore, verify_chain
from ledger.postgres.instance_keys import instance_key
from tests.audit_ledgers import finance_cli
from tests.cards import issue_command

pytestmark = pytest.mark.also_on_citus

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 60
KILL_AFTER_ROWS = (400, 1200)  # codes on disk before each SIGKILL: two interruptions at different points
ISSUED = "giftcard.Issued"
CREDITED = "giftcard.Credited"


def batch(batch_id: str, count: int, value: str = "25", **terms) -> BatchRequest:
    return BatchRequest(batch_id=batch_id, count=count, value=Decimal(value), **terms)


@pytest.fixture
def defaults(clock) -> BatchDefaults:
    return BatchDefaults(currency="USD", expiring_date=clock() + timedelta(days=365))


@pytest.fixture
def issuer(ledger: Ledger) -> BulkIssuer:
    return BulkIssuer(ledger, chunk_cards=64)  # small chunks: several transactions even in small tests


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


async def batch_cards(pool: asyncpg.Pool, batch_id: str) -> dict[str, str]:
    """relationName -> card id of every card of the batch in the database."""
    rows = await pool.fetch(
        "select relation_name, card_id from card_lookup where starts_with(relation_name, $1)", batch_id + "-"
    )
    return {row["relation_name"]: row["card_id"] for row in rows}


async def assert_codes_match_the_database(pool: asyncpg.Pool, rows: list[dict[str, str]], code_key: bytes) -> None:
    """Each row's code is the one whose hash the database holds for that card (one query for all)."""
    hashes = [hash_code(row["redemptionCode"], code_key) for row in rows]
    found = await pool.fetch(
        "select code_hash, card_id, relation_name from card_lookup where code_hash = any($1)", hashes
    )
    by_hash = {bytes(r["code_hash"]): (r["card_id"], r["relation_name"]) for r in found}
    assert [by_hash.get(h) for h in hashes] == [(row["cardId"], row["relationName"]) for row in rows]


# ---- pure rules -----------------------------------------------------------------------------------


def test_card_numbers_name_the_cards_and_terms_come_from_the_batch(defaults):
    assert relation_name("spring", 7) == "spring-000007"
    fresh = resolve_terms(batch("spring", 10), defaults, None)
    assert (fresh.value, fresh.currency, fresh.profile_id, fresh.caption) == (2500, "USD", "spring", "Gift card")
    first = BatchTerms(
        batch_id="spring", count=10, value=2500, currency="USD", expiring_date=defaults.expiring_date + timedelta(1),
        caption="Spring", profile_id="crm",
    )  # fmt: skip
    resumed = resolve_terms(batch("spring", 10), defaults, first)
    assert (resumed.expiring_date, resumed.caption, resumed.profile_id) == (first.expiring_date, "Spring", "crm")
    with pytest.raises(BatchTermsMismatch, match="value 25.00 USD"):
        resolve_terms(batch("spring", 10, "30"), defaults, first)
    with pytest.raises(errors.InvalidRequest, match="batchId"):
        resolve_terms(batch("no spaces", 10), defaults, None)
    with pytest.raises(errors.InvalidAmount):
        resolve_terms(batch("spring", 10, "0.001"), defaults, None)
    assert resolve_terms(batch("spring", 10, "0"), defaults, None).value == 0


def test_a_torn_last_line_is_dropped_and_a_corrupt_one_refused(tmp_path: Path):
    path = tmp_path / "codes.csv.partial"
    good = "0,id-0,b-000000,AAAA-BBBB-CCCC-DDDD,25.00,USD,2027-01-15T12:00:00Z\n"
    path.write_text(",".join(codes_file.COLUMNS) + "\n" + good + "1,id-1,b-00")
    content = codes_file.read_rows(path)
    assert [row.n for row in content.rows] == [0] and content.torn
    path.write_text("n,cardId,rel")  # the header itself cut short
    assert codes_file.read_rows(path) == codes_file.FileContent([], torn=True)
    path.write_text(",".join(codes_file.COLUMNS) + "\n" + "garbage\n" + good)
    with pytest.raises(CodesFileRefused, match="line 2"):
        codes_file.read_rows(path)


# ---- codes: written once, valid, never in clear in the database ---------------------------------------


async def test_every_code_is_written_once_and_redeems_its_card(issuer, ledger, defaults, pool, tmp_path):
    output = tmp_path / "codes.csv"
    outcome = await issuer.issue_to_file(batch("gift", 150), defaults, output, metadata={"actor": "test"})
    assert outcome.issued_now == 150 and outcome.already_issued == 0 and outcome.lost == []
    rows = rows_of(output)
    assert [int(row["n"]) for row in rows] == list(range(150))
    assert len({row["redemptionCode"] for row in rows}) == 150
    assert os.stat(output).st_mode & 0o077 == 0, "codes are readable by their owner only"
    assert not codes_file.partial_path(output).exists() and not codes_file.lock_path(output).exists()
    for row in rows:
        card = await ledger.find_by_code(row["redemptionCode"])
        assert card is not None and str(card.id) == row["cardId"] and card.relation_name == row["relationName"]
        assert card.balance == 2500 and card.currency == "USD" and row["value"] == "25.00"
    dump = await pool.fetchval(
        """
        select string_agg(t, ' ') from (
            select data::text || metadata::text as t from events
            union all select row(l.*)::text from card_lookup l
            union all select state::text from snapshots) everything
        """
    )
    for row in rows:
        code = row["redemptionCode"]
        assert code not in dump and normalize_code(code) not in dump


async def test_a_bulk_card_has_the_events_of_a_card_issued_one_by_one(issuer, ledger, defaults, store, pool, clock):
    command = issue_command(clock(), caption="Gift card", expiring_date=defaults.expiring_date)
    single = await ledger.issue(command, metadata={"actor": "test"})
    single_id = str(single.card.id)
    await ledger.create_transaction(
        single_id, operation="Credit", value=Decimal("25"), description="load", request_id="issue:x:0",
        metadata={"actor": "test"},
    )  # fmt: skip
    outcome = await issuer.issue_in_one_transaction(batch("shape", 3), defaults, metadata={"actor": "test"})
    bulk_id = outcome.cards[0].card_id

    def shape(events):
        return [(e.version, e.type, sorted(json.loads(e.data)), sorted(e.metadata)) for e in events]

    bulk_events, single_events = await store.read_stream(bulk_id), await store.read_stream(single_id)
    assert shape(bulk_events) == shape(single_events)
    assert [e.type for e in bulk_events] == [ISSUED, CREDITED]
    verify_chain(bulk_events)
    keys = await pool.fetch(
        "select stream_id, version, idempotency_key from events where stream_id = any($1) order by stream_id, version",
        [bulk_id, single_id],
    )
    assert {(r["version"], r["idempotency_key"]) for r in keys if r["stream_id"] == bulk_id} == {
        (1, None),
        (2, "transaction:issue:shape:0"),
    }

    fresh = Ledger(store, code_key=ledger.code_key, clock=clock)  # nothing cached: loaded from the events
    card = await fresh.card(bulk_id)
    assert card.balance == 2500 and card.relation_name == "shape-000000"
    replay = await fresh.create_transaction(
        bulk_id, operation="Credit", value=Decimal("25"), description="again", request_id="issue:shape:0"
    )
    assert replay.id == next(iter(card.transactions))  # the batch's requestId is the card's, as any Credit's
    debit = await fresh.create_transaction(
        bulk_id, operation="Debit", value=Decimal("10.50"), description="order", request_id="d1"
    )
    await fresh.settle(bulk_id, debit.id, value=Decimal("10.50"), request_id="s1")
    assert (await fresh.card(bulk_id)).balance == 1450
    verify_chain(await store.read_stream(bulk_id))


async def test_a_zero_value_issues_empty_cards_with_no_credit(issuer, defaults, pool):
    await issuer.issue_in_one_transaction(batch("empty", 5, "0"), defaults, metadata={})
    types = await pool.fetch("select type, count(*) from events group by type")
    assert {r["type"]: r["count"] for r in types} == {ISSUED: 5}


# ---- resuming ---------------------------------------------------------------------------------------


async def test_rows_of_a_chunk_that_never_committed_are_dropped_and_its_cards_issued_again(
    issuer, ledger, defaults, pool, tmp_path
):
    output = tmp_path / "codes.csv"
    await issuer.issue_to_file(batch("resume", 100), defaults, output, metadata={})
    # A crash between fsync and commit: rows on disk for cards 100..149 that the database never got.
    partial = codes_file.partial_path(output)
    os.replace(output, partial)
    with open(partial, "a", encoding="utf-8") as file:
        for n in range(100, 150):
            file.write(f"{n},00000000-0000-0000-0000-{n:012d},resume-{n:06d},0000-0000-0000-{n:04d},25.00,USD,x\n")
        file.write("150,00000000-00")  # and the first row of the next chunk cut short by the crash
    outcome = await issuer.issue_to_file(batch("resume", 150), defaults, output, metadata={})
    assert (outcome.issued_now, outcome.already_issued, outcome.lost) == (50, 100, [])
    rows = rows_of(output)
    assert [int(row["n"]) for row in rows] == list(range(150))
    assert not any(row["cardId"].startswith("00000000-") for row in rows)
    await assert_codes_match_the_database(pool, rows, ledger.code_key)
    assert len(await batch_cards(pool, "resume")) == 150


async def test_cards_whose_codes_are_not_in_the_output_are_reported_lost_not_reissued(issuer, defaults, pool, tmp_path):
    first = tmp_path / "first.csv"
    await issuer.issue_to_file(batch("lost", 40), defaults, first, metadata={})
    elsewhere = tmp_path / "elsewhere.csv"  # the earlier run's file is not the one named now
    outcome = await issuer.issue_to_file(batch("lost", 50), defaults, elsewhere, metadata={})
    assert (outcome.issued_now, outcome.already_issued) == (10, 40)
    assert [n for n, _ in outcome.lost] == list(range(40))
    assert [int(row["n"]) for row in rows_of(elsewhere)] == list(range(40, 50))
    assert len(await batch_cards(pool, "lost")) == 50


async def test_refusals_write_nothing(issuer, defaults, pool, tmp_path):
    output = tmp_path / "codes.csv"
    await issuer.issue_to_file(batch("terms", 10), defaults, output, metadata={})
    with pytest.raises(BatchTermsMismatch, match="caption 'Gift card'"):
        await issuer.issue_to_file(batch("terms", 20, caption="Other"), defaults, output, metadata={})
    with pytest.raises(CodesFileRefused, match="another batch"):
        await issuer.issue_to_file(batch("other", 10), defaults, output, metadata={})
    with pytest.raises(BatchTermsMismatch, match="count"):
        await issuer.issue_to_file(batch("terms", 5), defaults, output, metadata={})
    async with pool.acquire() as connection:
        await connection.execute("select pg_advisory_lock($1)", lock_key("busy"))
        with pytest.raises(BatchBusy):
            await issuer.issue_to_file(batch("busy", 10), defaults, tmp_path / "busy.csv", metadata={})
        with pytest.raises(BatchBusy):
            await issuer.issue_in_one_transaction(batch("busy", 10), defaults, metadata={})
        await connection.execute("select pg_advisory_unlock($1)", lock_key("busy"))
    assert len(rows_of(output)) == 10
    assert await pool.fetchval("select count(*) from card_lookup") == 10


async def run_cli(database_url: str, output: Path, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "cards", "issue", "--count", "2000", "--value", "12.50",
        "--currency", "EUR", "--batch-id", "killed", "--output", str(output), *extra,
        cwd=ROOT, env={**os.environ, "GIFTCARD_DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def codes_on_disk(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


async def test_a_cli_run_killed_twice_finishes_with_every_card_once_and_every_code_once(database_url, pool, tmp_path):
    output = tmp_path / "codes.csv"
    partial = codes_file.partial_path(output)
    for rows_before_kill in KILL_AFTER_ROWS:
        process = await run_cli(database_url, output, "--chunk-cards", "100", "--chunk-pause-s", "0.02")
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while await codes_on_disk(partial) < rows_before_kill:
            assert process.returncode is None, (await process.communicate())[1].decode()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        assert process.returncode == -signal.SIGKILL
        assert 0 < len(await batch_cards(pool, "killed")) < 2000, "killed mid-run"

    process = await run_cli(database_url, output, "--json")
    stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().startswith("batch killed")
    summary = json.loads(stdout.decode().splitlines()[-1])
    assert summary["issuedNow"] + summary["alreadyIssued"] == 2000 and summary["codesLost"] == []

    rows = rows_of(output)
    assert [int(row["n"]) for row in rows] == list(range(2000)), "every card's code exactly once, in order"
    cards = await batch_cards(pool, "killed")
    assert len(cards) == 2000 and {row["relationName"]: row["cardId"] for row in rows} == cards
    code_key = await instance_key(pool, "redemption-codes", None)
    await assert_codes_match_the_database(pool, rows, code_key)
    counts = await pool.fetch("select type, count(*), count(distinct stream_id) as streams from events group by type")
    assert {r["type"]: (r["count"], r["streams"]) for r in counts} == {ISSUED: (2000, 2000), CREDITED: (2000, 2000)}
    ledger = Ledger(EventStore(pool), code_key=code_key)
    for row in rows[::250]:
        card = await ledger.find_by_code(row["redemptionCode"])
        assert card is not None and card.balance == 1250 and card.currency == "EUR"
    assert not partial.exists()
    code, out, err = await finance_cli(database_url, "audit", "verify", "--json")  # chains and rules, every card
    assert code == 0 and json.loads(out)["cards"] == 2000, out + err


# ---- over HTTP ----------------------------------------------------------------------------------------


@pytest.fixture
async def bulk_service(start_service):
    return await start_service(run_projections=False)


async def test_http_answers_the_codes_once_and_a_retry_only_the_missing_cards(bulk_service, pool):
    ledger = bulk_service.app[LEDGER]
    body = {"batchId": "web", "count": 30, "value": 5.25, "currencyCode": "BRL", "caption": "Promo"}
    status, answer, headers = await bulk_service.call("POST", bulk_api.ROUTE, body)
    assert status == 200, answer
    assert (answer["batchId"], answer["issuedNow"], answer["alreadyIssued"]) == ("web", 30, 0)
    assert answer["value"] == 5.25 and answer["currencyCode"] == "BRL" and "note" not in answer
    assert "no-store" in headers["Cache-Control"]
    assert [card["n"] for card in answer["cards"]] == list(range(30))
    for card in answer["cards"]:
        found = await ledger.find_by_code(card["redemptionCode"])
        assert str(found.id) == card["id"] and found.balance == 525 and found.caption == "Promo"
        assert card["_self"]["href"] == f"/api/giftcards/{card['id']}"
        status, shown, _ = await bulk_service.call("GET", card["_self"]["href"])
        assert status == 200 and shown["redemptionCode"] != card["redemptionCode"]  # masked ever after

    status, retry, _ = await bulk_service.call("POST", bulk_api.ROUTE, {**body, "count": 40})
    assert status == 200 and (retry["issuedNow"], retry["alreadyIssued"]) == (10, 30)
    assert [card["n"] for card in retry["cards"]] == list(range(30, 40))
    assert "cannot be shown again" in retry["note"] and retry["caption"] == "Promo"
    status, again, _ = await bulk_service.call("POST", bulk_api.ROUTE, {**body, "count": 40})
    assert status == 200 and again["cards"] == [] and again["alreadyIssued"] == 40
    assert len(await batch_cards(pool, "web")) == 40

    status, generated, _ = await bulk_service.call("POST", bulk_api.ROUTE, {"count": 2, "value": 0})
    assert status == 200 and generated["batchId"].startswith("batch-") and generated["currencyCode"] == "USD"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"count": 0, "value": 10}, "count"),
        ({"count": bulk_api.BATCH_CARDS_PER_REQUEST_MAX + 1, "value": 10}, "giftcard cards issue"),
        ({"count": 2, "value": 10.001}, "decimals"),
        ({"count": 2, "value": -1}, "value"),
        ({"count": 2, "value": 10, "currencyCode": "XXX"}, "currencyCode"),
        ({"count": 2, "value": 10, "batchId": "with space"}, "batchId"),
        ({"count": 2, "value": 10, "expiringDate": "2020-01-01T00:00:00Z"}, "expiringDate"),
        ({"count": 2, "value": 10, "expiringDate": "soon"}, "expiringDate"),
        ({"count": 2}, "value"),
        ({"count": "2", "value": 10}, "count"),
    ],
)
async def test_http_refuses_bad_batches_with_a_400_naming_the_field(bulk_service, pool, body, named):
    status, answer, _ = await bulk_service.call("POST", bulk_api.ROUTE, body)
    assert status == 400, answer
    assert named in answer["error"]["message"]
    assert await pool.fetchval("select count(*) from events") == 0


async def test_http_retry_with_other_terms_is_a_409(bulk_service):
    assert (await bulk_service.call("POST", bulk_api.ROUTE, {"batchId": "t", "count": 2, "value": 1}))[0] == 200
    status, answer, _ = await bulk_service.call("POST", bulk_api.ROUTE, {"batchId": "t", "count": 3, "value": 2})
    assert status == 409 and answer["error"]["code"] == "batch_terms_mismatch"


async def test_http_batches_need_the_edit_role(bulk_service, pool):
    key, token = await auth.create_key(pool, auth.HUB, (auth.VIEW,))
    headers = {"X-VTEX-API-AppKey": key, "X-VTEX-API-AppToken": token}
    deadline = time.monotonic() + 2 * auth.KEY_REFRESH_S + 1
    while True:  # stored keys reach the service within its refresh interval
        status, answer, _ = await bulk_service.call("POST", bulk_api.ROUTE, {"count": 1, "value": 1}, headers=headers)
        if status != 403 or answer is not None or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert status == 403 and answer["error"]["code"] == "forbidden"
    async with bulk_service.session.post(bulk_service.base_url + bulk_api.ROUTE, json={}) as response:
        assert response.status == 401
    assert await pool.fetchval("select count(*) from events") == 0
    assert openapi.describe("POST", bulk_api.ROUTE) is not None


def test_the_output_is_rewritten_sorted_only_when_a_resumed_run_filled_a_gap():
    assert in_card_order([0, 1, 2], [3, 4]) and in_card_order([], [0, 1]) and in_card_order([0, 1], [])
    assert not in_card_order([0, 1, 5], [2, 3]) and not in_card_order([1, 0], [])
