"""Finance exports: transactions as CSV, JSON Lines and Parquet with exact amounts, liabilities as of a
date, totals that reconcile (export == verify == liabilities == the ledger), memory flat."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import json
import os
import pty
import select
import struct
import sys
import termios
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ledger.application.commands import IssueCard
from ledger.domain.money import to_major
from projections.audit.auditors import audit_card, verify
from projections.events import ISSUED, SETTLED
from projections.exports.export_files import (
    COLUMNS,
    FORMATS,
    ExportFilter,
    LedgerInconsistent,
    export_liabilities,
    export_transactions,
)
from tests.audit_ledgers import (
    NATIVE,
    as_owner_bypassing_immutability,
    catch_up,
    finance_cli,
    write_forwarded,
    write_history,
    write_many_cards,
)

pytestmark = pytest.mark.also_on_citus

NATIVE_ROWS = 5 + 1 + 2  # transactions, settlements, cancellations of the history
FORWARDED_ROWS = 1 + 1 + 1  # the replayed transaction counts once; the refused call and card creation not at all


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


async def test_transactions_export_as_csv_jsonl_and_parquet_with_exact_amounts(
    ledger, clock, store, database_url, tmp_path
):
    history = await write_history(ledger, clock)
    await write_forwarded(store)
    outputs = {f: tmp_path / f"transactions.{f}" for f in ("csv", "jsonl", "parquet")}
    for file_format, output in outputs.items():
        code, out, err = await finance_cli(
            database_url, "export", "transactions", "--format", file_format, "--output", str(output)
        )
        assert code == 0, err
        assert f"exported {NATIVE_ROWS + FORWARDED_ROWS} row(s)" in out
        assert "event/s" not in err and "it/s" not in err, "no progress bar when stderr is not a terminal"
        assert not output.with_name(output.name + ".partial").exists()

    rows = read_csv(outputs["csv"])
    assert list(rows[0]) == COLUMNS
    native = [r for r in rows if r["provider"] == NATIVE]
    assert [(r["kind"], r["operation"], r["currency"], r["amount"]) for r in native if r["card_id"] == history.usd] == [
        ("transaction", "Credit", "USD", "100.00"),
        ("transaction", "Debit", "USD", "30.50"),
        ("settlement", "Debit", "USD", "20.00"),
        ("cancellation", "Debit", "USD", "15.00"),
        ("cancellation", "Credit", "USD", "5.00"),
    ]
    cancelled = next(r for r in native if r["kind"] == "cancellation" and r["operation"] == "Debit")
    assert (cancelled["released"], cancelled["refunded"], cancelled["date"]) == (
        "10.50",
        "4.50",
        "2026-01-17T12:00:00+00:00",
    )
    assert sorted(r["amount"] for r in native if r["card_id"] in (history.jpy, history.bhd)) == [
        "0.005",
        "12.345",
        "500",
    ]
    assert next(r for r in native if r["transaction_id"] == history.credit)["order_id"] == "o-1"
    forwarded = [
        (r["provider"], r["source"], r["kind"], r["operation"], r["currency"], r["amount"])
        for r in rows
        if r["provider"] == "Acme"
    ]
    assert forwarded == [
        ("Acme", "forwarded", "transaction", "", "", "40.5"),  # the hub records neither direction nor currency
        ("Acme", "forwarded", "settlement", "", "", "30"),
        ("Acme", "forwarded", "cancellation", "", "", "10.5"),
    ]

    lines = [json.loads(line) for line in outputs["jsonl"].read_text().splitlines()]
    assert [line["amount"] for line in lines] == [r["amount"] for r in rows]  # strings: exact, never floats
    assert {line["provider"]: line["currency"] for line in lines if line["card_id"] == history.usd} == {NATIVE: "USD"}
    assert {line["currency"] for line in lines if line["provider"] == "Acme"} == {None}

    table = pq.read_table(outputs["parquet"])
    assert table.schema.field("amount").type == pa.decimal128(38, 4)
    assert table.column_names == COLUMNS and table.num_rows == len(rows)
    assert table.column("amount").to_pylist() == [Decimal(r["amount"]) for r in rows]
    assert b"decimal128(38, 4)" in table.schema.metadata[b"amounts"]


async def test_transactions_export_filters(ledger, clock, store, pool, tmp_path):
    history = await write_history(ledger, clock)
    await write_forwarded(store)

    async def exported(**where) -> list[dict[str, str]]:
        output = tmp_path / "filtered.csv"
        result = await export_transactions(pool, output, "csv", NATIVE, ExportFilter(**where), batch_rows=2)
        rows = read_csv(output)
        assert result.rows == len(rows)
        return rows

    assert [r["amount"] for r in await exported(currency="JPY")] == ["500"]
    assert {r["provider"] for r in await exported(provider="Acme")} == {"Acme"}
    assert len(await exported(provider=NATIVE)) == NATIVE_ROWS
    assert await exported(provider="Nobody") == []
    day_16 = await exported(since=datetime(2026, 1, 16, tzinfo=UTC), until=datetime(2026, 1, 17, tzinfo=UTC))
    assert sorted((r["card_id"], r["kind"]) for r in day_16) == sorted(
        [(history.usd, "settlement"), (history.jpy, "transaction"), (history.bhd, "transaction")]
        + [(history.bhd, "transaction")]
    )


async def test_export_totals_equal_verify_totals_equal_liabilities_and_the_ledger(ledger, clock, store, pool, tmp_path):
    history = await write_history(ledger, clock)
    await write_forwarded(store)
    await write_many_cards(pool, clock.now, 20)
    await catch_up(pool)

    exported = await export_transactions(pool, tmp_path / "all.parquet", "parquet", NATIVE, batch_rows=7)
    verified = await verify(pool, NATIVE, batch_events_max=5)
    assert verified.ok and exported.totals == verified.totals
    liabilities = await export_liabilities(pool, clock.now.date(), batch_rows=3)  # before any card expires
    assert exported.totals.balance_change(NATIVE) == liabilities.outstanding

    ledger_balances: dict[str, int] = {}
    for row in await pool.fetch("select stream_id from events where version = 1 and type = $1", ISSUED):
        card = await ledger.card(row["stream_id"])
        ledger_balances[card.currency] = ledger_balances.get(card.currency, 0) + card.balance
    assert liabilities.outstanding == ledger_balances == {"BHD": 12_340, "JPY": 500, "USD": 7_950 + 20 * 7_950}
    assert liabilities.cards == {"BHD": 1, "JPY": 1, "USD": 1 + 20}
    assert (await ledger.card(history.usd)).balance == 7_950


async def test_liabilities_as_of_a_date_reconcile_to_the_daily_totals(ledger, clock, pool, database_url, tmp_path):
    history = await write_history(ledger, clock)
    await catch_up(pool)

    async def outstanding(day: str) -> dict[str, Decimal]:
        code, out, err = await finance_cli(database_url, "export", "liabilities", "--as-of", day, "--json")
        assert code == 0, err
        return {t["currency"]: Decimal(str(t["outstanding"])) for t in json.loads(out)["totals"]}

    async def projected(day: str) -> dict[str, Decimal]:
        rows = await pool.fetch(
            "select currency, sum(balance_change) as liability from read_daily_totals where day <= $1 group by currency",
            date.fromisoformat(day),
        )
        return {r["currency"]: to_major(int(r["liability"]), r["currency"]) for r in rows if r["liability"]}

    assert await outstanding("2026-01-14") == {} == await projected("2026-01-14")
    assert await outstanding("2026-01-15") == {"USD": Decimal("69.50")} == await projected("2026-01-15")
    day_16 = {"BHD": Decimal("12.340"), "JPY": Decimal("500"), "USD": Decimal("69.50")}
    assert await outstanding("2026-01-16") == day_16 == await projected("2026-01-16")
    assert await outstanding("2026-01-17") == {**day_16, "USD": Decimal("79.50")} == await projected("2026-01-17")

    output = tmp_path / "liabilities.csv"
    code, out, err = await finance_cli(
        database_url, "export", "liabilities", "--as-of", "2026-01-16", "--output", str(output)
    )
    assert code == 0, err
    assert "USD" in out and "69.50" in out
    rows = read_csv(output)
    assert sorted((r["card_id"], r["currency"], r["balance"]) for r in rows) == sorted(
        [(history.usd, "USD", "69.50"), (history.jpy, "JPY", "500"), (history.bhd, "BHD", "12.340")]
    )
    code, _, err = await finance_cli(database_url, "export", "liabilities", "--as-of", "16/01/2026")
    assert code == 2 and "date" in err


async def test_a_progress_bar_on_a_terminal(pool, clock, database_url, tmp_path):
    """stderr a terminal (a pseudo-terminal of 30 rows, 100 columns): a tqdm bar counts the events read."""
    await write_many_cards(pool, clock.now, 10)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hub.cli",
            "export",
            "transactions",
            "--format",
            "jsonl",
            "--output",
            str(tmp_path / "t.jsonl"),
            env={**os.environ, "GIFTCARD_DATABASE_URL": database_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=terminal,
        )
        await asyncio.wait_for(process.communicate(), 60)
        shown = b""
        while select.select([controller], [], [], 0.1)[0]:
            shown += os.read(controller, 65536)
    finally:
        os.close(terminal)
        os.close(controller)
    assert process.returncode == 0
    assert b"export: 100%" in shown and b"50/50" in shown, shown  # five money events per card


@pytest.mark.parametrize("file_format", FORMATS)
async def test_an_export_the_ledger_cannot_support_fails_and_leaves_no_file(
    ledger, clock, pool, database_url, tmp_path, file_format
):
    history = await write_history(ledger, clock)
    await write_many_cards(pool, clock.now, 50)  # rows after the broken card's: a batch is being read when it fails
    await as_owner_bypassing_immutability(pool, "delete from events where stream_id = $1 and version = 1", history.jpy)
    output = tmp_path / f"out.{file_format}"
    code, _, err = await finance_cli(
        database_url, "export", "transactions", "--format", file_format, "--output", str(output)
    )
    assert code == 1 and history.jpy in err and "audit verify" in err
    assert not output.exists() and not output.with_name(output.name + ".partial").exists()


@pytest.mark.parametrize("file_format", FORMATS)
async def test_an_amount_stored_as_text_is_refused_by_every_format(ledger, clock, pool, tmp_path, file_format):
    """The domain writes amounts as JSON numbers; "12" read as 12 would hide a corrupt event."""
    await write_history(ledger, clock)
    await as_owner_bypassing_immutability(
        pool,
        # The JSON string built by a cast, not to_jsonb: Citus runs no STABLE function on a shard's columns.
        """update events set data = jsonb_set(data, '{value}', ('"' || (data->>'value') || '"')::jsonb)
        where position = (select min(position) from events where type = $1)""",
        SETTLED,
    )
    output = tmp_path / f"out.{file_format}"
    with pytest.raises(LedgerInconsistent, match="audit verify"):
        await export_transactions(pool, output, file_format, NATIVE)
    assert not output.exists() and not output.with_name(output.name + ".partial").exists()


async def test_exports_memory_stays_flat_however_large_the_ledger(pool, clock, tmp_path):
    """Ten times the events, about the same peak, for CSV, JSON Lines and the liabilities' replay.
    (Parquet batches live in Arrow's own memory pool, outside tracemalloc: they are the same record
    batches, one per cursor batch.) CSV comes out of COPY in chunks as large as the socket reads that
    bring them, whatever the ledger: on a ledger too small to fill them they are smaller, so CSV is
    compared from the ten times larger ledger on, with a hundred times the events."""
    small_cards, batch_rows = 100, 200

    async def peak(measure: Callable[[], Awaitable[object]]) -> int:
        tracemalloc.start()
        await measure()
        found = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return found

    def export(file_format: str) -> Callable[[], Awaitable[object]]:
        return lambda: export_transactions(
            pool, tmp_path / f"t.{file_format}", file_format, NATIVE, batch_rows=batch_rows
        )

    async def liabilities() -> object:
        return await export_liabilities(pool, date.today(), batch_rows=batch_rows, on_card=lambda card: None)

    async def peaks() -> dict[str, int]:
        return {
            "csv": await peak(export("csv")),
            "jsonl": await peak(export("jsonl")),
            "liabilities": await peak(liabilities),
        }

    await write_many_cards(pool, clock.now, small_cards)
    small = await peaks()
    await write_many_cards(pool, clock.now, small_cards * 9)
    large = await peaks()
    rows = read_csv(tmp_path / "t.csv")
    assert len(rows) == 10 * small_cards * 5  # five money events per card
    for name in ("jsonl", "liabilities"):
        assert large[name] < small[name] * 1.5, (name, small, large)
    await write_many_cards(pool, clock.now, small_cards * 90)
    largest = await peak(export("csv"))
    assert len(read_csv(tmp_path / "t.csv")) == 100 * small_cards * 5
    assert largest < large["csv"] * 1.5, (large, largest)


async def test_a_voided_hold_is_a_cancellation_that_reconciles(ledger, clock, store, pool, tmp_path):
    """A Debit whose hold expired is voided by the ledger itself: exported, verified and owed like a cancellation."""
    history = await write_history(ledger, clock)
    debit = await ledger.create_transaction(
        history.jpy, operation="Debit", value=Decimal(120), description="never settled", request_id="stale"
    )
    clock.advance(timedelta(days=2))
    voided = await ledger.void_expired_hold(history.jpy, debit.id, hold_ttl=timedelta(days=1))
    assert voided is not None and voided.value == 120
    await catch_up(pool)

    exported = await export_transactions(pool, tmp_path / "t.csv", "csv", NATIVE)
    void_row = [r for r in read_csv(tmp_path / "t.csv") if r["oid"] == voided.oid]
    assert [(r["kind"], r["operation"], r["amount"], r["released"], r["refunded"]) for r in void_row] == [
        ("cancellation", "Debit", "120", "120", "0")
    ]
    verified = await verify(pool, NATIVE)
    assert verified.ok, [f.line() for f in verified.failures]
    assert exported.totals == verified.totals
    liabilities = await export_liabilities(pool, date.today())
    assert liabilities.outstanding["JPY"] == 500 == exported.totals.balance_change(NATIVE)["JPY"]
    steps = [(e.step.kind, e.step.balance) for e in (await audit_card(store, history.jpy)).entries if e.step]
    assert steps[-2:] == [("transaction", 380), ("cancellation", 500)]


@pytest.mark.parametrize("slice_bytes", [1, 7, 64 * 1024])
async def test_csv_keeps_awkward_text_whole_wherever_the_copy_is_cut(
    ledger, clock, store, pool, tmp_path, monkeypatch, slice_bytes
):
    """Commas, quotes, LF and CRLF inside fields, with COPY's stream cut every ``slice_bytes``: each
    field reads back as written, records end in CRLF, and the totals are the JSON Lines export's."""
    monkeypatch.setattr("projections.exports.export_files.CSV_SLICE_BYTES_MAX", slice_bytes)
    await write_history(ledger, clock)
    await write_forwarded(store)
    card_id = str((await ledger.issue(IssueCard(relation_name="awkward", caption="c", profile_id="p",
                                                currency="USD", expiring_date=clock.now + timedelta(days=9)))).card.id)  # fmt: skip
    awkward = ["a,b", 'say "hi"', "two\nlines", "crlf\r\nend", '"', ",\n,", ""]
    for n, text in enumerate(awkward):
        await ledger.create_transaction(
            card_id, operation="Credit", value=Decimal(1), description=text, request_id=f"awkward-{n}"
        )
    csv_result = await export_transactions(pool, tmp_path / "t.csv", "csv", NATIVE)
    jsonl_result = await export_transactions(pool, tmp_path / "t.jsonl", "jsonl", NATIVE)

    rows = read_csv(tmp_path / "t.csv")
    assert [r["description"] for r in rows if r["card_id"] == card_id] == awkward
    assert csv_result.rows == len(rows) == jsonl_result.rows
    assert csv_result.totals == jsonl_result.totals
    raw = (tmp_path / "t.csv").read_bytes()
    assert raw.endswith(b"\r\n") and raw.count(b"\r\n") == len(rows) + 1 + 1  # + header, + the CRLF in a field
