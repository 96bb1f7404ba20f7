"""Finance exports, read straight from the events (not the lagging read models), streamed.

``export_transactions`` writes one row per transaction, settlement and cancellation, oldest
first, native and forwarded to external providers, as CSV, JSON Lines or Parquet. It reads
the events through one server-side cursor, in batches of ``batch_rows``, inside one
read-only repeatable-read transaction (a consistent snapshot), and looks up what a batch
needs beyond its own events (each card's currency, each settled or cancelled transaction's
direction) with one query per batch: memory stays flat however large the ledger. It adds up
what it writes into the same ``Totals`` that ``audit verify`` computes from its replay.

``export_liabilities`` replays every card through the domain up to the end of a day (UTC,
effective time) and yields the outstanding balance of each, with the total per currency.

Amounts are exact decimals in major units of ``currency``: strings in CSV and JSON Lines,
``decimal128(38, 4)`` in Parquet (10^-4 is the finest minor unit of any ISO 4217 currency the
ledger supports, so every amount fits exactly; ``currency`` says how many decimals count).
An external provider's currency is not recorded by the hub: ``currency`` is empty there.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import IO, Any

import asyncpg
import msgspec

from ledger.store import RecordedEvent, recorded_event
from projections import events as ev
from projections.forwarded import FORWARDED_REPLAYS_CTE, forwarded_move
from projections.replay import (
    CANCELLATION,
    CARD_TOPICS,
    EVENT_COLUMNS,
    SETTLEMENT,
    TRANSACTION,
    CardReplay,
    cursor_batches,
    effective_at,
    transaction_id_of,
)
from projections.totals import TotalKey, Totals, major

EXPORT_BATCH_ROWS = 2_000  # events per cursor fetch, and rows per Parquet row group at most
FORMATS = ("csv", "jsonl", "parquet")
LIABILITY_FORMATS = ("csv", "jsonl")
PARQUET_AMOUNT_PRECISION = 38
PARQUET_AMOUNT_SCALE = ev.UNKNOWN_CURRENCY_EXPONENT  # 4: the finest minor unit of any supported currency

_NATIVE_MONEY_TOPICS = [ev.CREDITED, ev.DEBITED, ev.SETTLED, ev.CANCELLED, ev.VOIDED]  # a void: a cancellation
_MONEY_OPERATIONS = [ev.FORWARDED_CREATE_TRANSACTION, ev.FORWARDED_SETTLE, ev.FORWARDED_CANCEL]

# $1 native money topics, $2 forwarded money operations, $3 since (inclusive), $4 until (exclusive),
# $5 provider, $6 the native provider's id. Effective time: the event's date, else when it was recorded.
_EXPORT_EVENTS = f"""
with {FORWARDED_REPLAYS_CTE}
select {EVENT_COLUMNS}
from events e
where (e.type = any($1::text[])
       or (e.type = '{ev.FORWARDED}' and e.data->>'outcome' = '{ev.FORWARDED_OK}'
           and e.data->>'operation' = any($2::text[])
           and e.position not in (select position from forwarded_replays)))
  and ($3::timestamptz is null or coalesce((e.data->>'date')::timestamptz, e.recorded_at) >= $3)
  and ($4::timestamptz is null or coalesce((e.data->>'date')::timestamptz, e.recorded_at) < $4)
  and ($5::text is null or case when e.type = '{ev.FORWARDED}' then e.data->>'providerId' = $5 else $5 = $6 end)
order by e.position
"""

_CURRENCIES = """
select stream_id, data->>'currency' as currency from events
where version = 1 and type = $1 and stream_id = any($2::text[])
"""

_DIRECTIONS = """
select e.stream_id, e.data->>'transaction_id' as transaction_id, e.type
from events e
join unnest($1::text[], $2::text[]) as k(stream_id, transaction_id)
  on e.stream_id = k.stream_id and e.data->>'transaction_id' = k.transaction_id
where e.type = any($3::text[])
"""

_CARD_EVENTS = f"select {EVENT_COLUMNS} from events e where e.type = any($1::text[]) order by e.stream_id, e.version"


class LedgerInconsistent(Exception):
    """The events cannot be turned into exact figures; ``giftcard audit verify`` names why."""


# ---- transactions ------------------------------------------------------------------------------


class ExportRow(msgspec.Struct, frozen=True):
    position: int
    date: datetime  # effective: the ledger's clock (native), when the hub recorded the call (forwarded)
    recorded_at: datetime
    provider: str
    source: str  # "ledger" (native) or "forwarded"
    card_id: str
    transaction_id: str
    kind: str  # transaction, settlement, cancellation
    operation: str | None  # Credit or Debit (of a settlement or cancellation: its transaction's)
    oid: str | None
    currency: str | None
    amount: int  # units: minor units of currency; 10^-4 when currency is None
    released: int | None = None
    refunded: int | None = None
    request_id: str | None = None
    order_id: str | None = None
    description: str | None = None


COLUMNS = list(ExportRow.__struct_fields__)
AMOUNT_COLUMNS = ("amount", "released", "refunded")


@dataclass(frozen=True)
class ExportFilter:
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    provider: str | None = None
    currency: str | None = None


@dataclass
class ExportResult:
    rows: int = 0
    totals: Totals = field(default_factory=Totals)


async def export_transactions(
    pool: asyncpg.Pool,
    output: Path,
    file_format: str,
    native_provider_id: str,
    where: ExportFilter = ExportFilter(),
    *,
    batch_rows: int = EXPORT_BATCH_ROWS,
    on_progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Writes the rows to ``output`` (through a ``.partial`` file renamed at the end, so a failed
    export never leaves a file that looks complete) and returns their count and totals."""
    result = ExportResult()
    partial = output.with_name(output.name + ".partial")
    writer = _writer(file_format, partial)
    try:
        async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
            args = (_NATIVE_MONEY_TOPICS, _MONEY_OPERATIONS, where.since, where.until, where.provider)
            async for batch in cursor_batches(connection, _EXPORT_EVENTS, (*args, native_provider_id), batch_rows):
                rows = await _rows_of(connection, [recorded_event(r) for r in batch], native_provider_id)
                rows = [row for row in rows if where.currency is None or row.currency == where.currency]
                writer.write(rows)
                for row in rows:
                    result.totals.add(TotalKey(row.provider, row.currency, row.kind, row.operation), row.amount)
                result.rows += len(rows)
                if on_progress is not None:
                    on_progress(len(batch))
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)
    return result


async def count_export_events(pool: asyncpg.Pool) -> int:
    """An upper bound of the events an export reads, for a progress bar's total."""
    types = [*_NATIVE_MONEY_TOPICS, ev.FORWARDED]
    return await pool.fetchval("select count(*) from events where type = any($1::text[])", types)


async def count_card_events(pool: asyncpg.Pool) -> int:
    """The events ``export_liabilities`` reads, for a progress bar's total."""
    return await pool.fetchval("select count(*) from events where type = any($1::text[])", list(CARD_TOPICS))


async def _rows_of(connection: asyncpg.Connection, events: list[RecordedEvent], native: str) -> list[ExportRow]:
    native_events = [e for e in events if e.type != ev.FORWARDED]
    currencies = await _currencies(connection, native_events)
    directions = await _directions(connection, native_events)
    rows = []
    for event in events:
        with _decoding(event):
            row = (
                _forwarded_row(event)
                if event.type == ev.FORWARDED
                else _native_row(event, native, currencies, directions)
            )
        if row is not None:
            rows.append(row)
    return rows


@contextlib.contextmanager
def _decoding(event: RecordedEvent) -> Iterator[None]:
    """An event whose data is not what its type says cannot give an exact row: stop, naming it."""
    try:
        yield
    except msgspec.MsgspecError as e:
        raise LedgerInconsistent(
            f"event at position {event.position} ({event.type} on {event.stream_id}) does not decode: {e}; "
            "run giftcard audit verify"
        ) from e


async def _currencies(connection: asyncpg.Connection, events: list[RecordedEvent]) -> dict[str, str]:
    stream_ids = sorted({e.stream_id for e in events})
    found = {r["stream_id"]: r["currency"] for r in await connection.fetch(_CURRENCIES, ev.ISSUED, stream_ids)}
    missing = [s for s in stream_ids if found.get(s) is None]
    if missing:
        raise LedgerInconsistent(f"card {missing[0]} has money events but no issue event; run giftcard audit verify")
    return found


async def _directions(connection: asyncpg.Connection, events: list[RecordedEvent]) -> dict[tuple[str, str], str]:
    """Credit or Debit of every transaction a settlement or cancellation of the batch names."""
    known: dict[tuple[str, str], str] = {}
    wanted: set[tuple[str, str]] = set()
    for event in events:
        with _decoding(event):
            key = (event.stream_id, transaction_id_of(event) or "")
        if event.type in ev.OPERATION_OF:
            known[key] = ev.OPERATION_OF[event.type]
        elif key not in known:
            wanted.add(key)
    if wanted:
        keys = sorted(wanted)
        rows = await connection.fetch(_DIRECTIONS, [k[0] for k in keys], [k[1] for k in keys], list(ev.OPERATION_OF))
        known |= {(r["stream_id"], r["transaction_id"]): ev.OPERATION_OF[r["type"]] for r in rows}
    return known


def _native_row(
    event: RecordedEvent, native: str, currencies: dict[str, str], directions: dict[tuple[str, str], str]
) -> ExportRow:
    currency = currencies[event.stream_id]
    common = dict(
        position=event.position,
        date=effective_at(event),
        recorded_at=event.recorded_at,
        provider=native,
        source="ledger",
        card_id=event.stream_id,
        currency=currency,
    )
    if event.type in ev.OPERATION_OF:
        created = ev.decode(event, ev.TransactionCreated)
        return ExportRow(
            **common,
            transaction_id=created.transaction_id,
            kind=TRANSACTION,
            operation=ev.OPERATION_OF[event.type],
            oid=None,
            amount=created.value,
            request_id=created.request_id,
            order_id=created.order_id,
            description=created.description,
        )
    if event.type == ev.SETTLED:
        settled = ev.decode(event, ev.Settled)
        return ExportRow(
            **common,
            transaction_id=settled.transaction_id,
            kind=SETTLEMENT,
            operation=directions.get((event.stream_id, settled.transaction_id)),
            oid=settled.oid,
            amount=settled.value,
            request_id=settled.request_id,
        )
    cancelled = ev.decode(event, ev.Cancelled)  # Cancelled or Voided: the same fields
    return ExportRow(
        **common,
        transaction_id=cancelled.transaction_id,
        kind=CANCELLATION,
        operation=directions.get((event.stream_id, cancelled.transaction_id)),
        oid=cancelled.oid,
        amount=cancelled.value,
        released=cancelled.released,
        refunded=cancelled.refunded,
        request_id=cancelled.request_id,
    )


def _forwarded_row(event: RecordedEvent) -> ExportRow | None:
    move = forwarded_move(event)
    if move is None:
        return None  # no exact amount, or no card: the read models leave it out too
    return ExportRow(
        position=event.position,
        date=event.recorded_at,
        recorded_at=event.recorded_at,
        provider=move.provider,
        source="forwarded",
        card_id=move.card_id,
        transaction_id=move.transaction_id,
        kind=move.kind,
        operation=None,  # the hub does not record a forwarded transaction's direction
        oid=move.oid,
        currency=None,
        amount=move.amount,
        request_id=move.request_id,
    )


# ---- writers ---------------------------------------------------------------------------------


def _rendered(row: ExportRow) -> dict[str, Any]:
    """The row with exact major-unit decimals and UTC instants."""
    values = {name: getattr(row, name) for name in COLUMNS}
    for name in AMOUNT_COLUMNS:
        if values[name] is not None:
            values[name] = major(values[name], row.currency)
    values["date"] = row.date.astimezone(UTC)
    values["recorded_at"] = row.recorded_at.astimezone(UTC)
    return values


class _CsvWriter:
    def __init__(self, path: Path, columns: list[str]) -> None:
        self.file: IO[str] = path.open("w", newline="", encoding="utf-8")
        self.csv = csv.writer(self.file)
        self.csv.writerow(columns)

    def write_values(self, rows: Iterable[dict[str, Any]]) -> None:
        self.csv.writerows([_csv_text(v) for v in row.values()] for row in rows)

    def write(self, rows: list[ExportRow]) -> None:
        self.write_values(_rendered(row) for row in rows)

    def close(self) -> None:
        self.file.close()


def _csv_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)  # a Decimal prints exactly: 30.50, 1000, 0.0001


_jsonl_encoder = msgspec.json.Encoder(decimal_format="string")  # exact decimals, never floats


class _JsonLinesWriter:
    def __init__(self, path: Path) -> None:
        self.file: IO[bytes] = path.open("wb")

    def write_values(self, rows: Iterable[dict[str, Any]]) -> None:
        self.file.write(b"".join(_jsonl_encoder.encode(row) + b"\n" for row in rows))

    def write(self, rows: list[ExportRow]) -> None:
        self.write_values(_rendered(row) for row in rows)

    def close(self) -> None:
        self.file.close()


class _ParquetWriter:
    """One record batch per cursor batch, each written as it comes (pyarrow is imported only here)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        amount = pa.decimal128(PARQUET_AMOUNT_PRECISION, PARQUET_AMOUNT_SCALE)
        instant = pa.timestamp("us", tz="UTC")
        types = {"position": pa.int64(), "date": instant, "recorded_at": instant}
        types |= dict.fromkeys(AMOUNT_COLUMNS, amount)
        self.schema = pa.schema(
            [pa.field(name, types.get(name, pa.string()), nullable=name != "position") for name in COLUMNS],
            metadata={
                "amounts": f"exact major units of currency, decimal128({PARQUET_AMOUNT_PRECISION}, "
                f"{PARQUET_AMOUNT_SCALE}); currency empty: an external provider's, not recorded by the hub"
            },
        )
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, rows: list[ExportRow]) -> None:
        if rows:
            self.writer.write_batch(self.pa.RecordBatch.from_pylist([_rendered(r) for r in rows], schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def _writer(file_format: str, path: Path) -> _CsvWriter | _JsonLinesWriter | _ParquetWriter:
    if file_format == "csv":
        return _CsvWriter(path, COLUMNS)
    if file_format == "jsonl":
        return _JsonLinesWriter(path)
    if file_format == "parquet":
        return _ParquetWriter(path)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {file_format!r}")


# ---- liabilities -------------------------------------------------------------------------------


class CardLiability(msgspec.Struct, frozen=True):
    card_id: str
    currency: str
    balance: int  # minor units outstanding at the end of the day
    version: int  # the card's last event by then
    issued_at: datetime
    expiring_date: datetime


LIABILITY_COLUMNS = ["card_id", "currency", "balance", "version", "issued_at", "expiring_date"]


@dataclass
class LiabilitiesResult:
    as_of: date
    cutoff: datetime  # exclusive: the first instant of the next UTC day
    cards: dict[str, int] = field(default_factory=dict)  # per currency: cards with a balance outstanding
    outstanding: dict[str, int] = field(default_factory=dict)  # per currency, minor units

    def add(self, card: CardLiability) -> None:
        self.cards[card.currency] = self.cards.get(card.currency, 0) + 1
        self.outstanding[card.currency] = self.outstanding.get(card.currency, 0) + card.balance


def end_of_day(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC)


async def export_liabilities(
    pool: asyncpg.Pool,
    as_of: date,
    *,
    on_card: Callable[[CardLiability], None] | None = None,
    batch_rows: int = EXPORT_BATCH_ROWS,
    on_progress: Callable[[int], None] | None = None,
) -> LiabilitiesResult:
    """Every card with a balance at the end of ``as_of`` (UTC), replayed through the domain one at a
    time in (card, version) order; raises LedgerInconsistent if a card cannot be replayed."""
    result = LiabilitiesResult(as_of, end_of_day(as_of))
    card: _CardUntil | None = None
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        async for batch in cursor_batches(connection, _CARD_EVENTS, (list(CARD_TOPICS),), batch_rows):
            for row in batch:
                event = recorded_event(row)
                if card is None or card.replay.stream_id != event.stream_id:
                    _close_card(card, result, on_card)
                    card = _CardUntil(CardReplay(event.stream_id), result.cutoff)
                card.apply(event)
            if on_progress is not None:
                on_progress(len(batch))
        _close_card(card, result, on_card)
    return result


@dataclass
class _CardUntil:
    """One card replayed up to a cutoff. A stream is a prefix in time: after the first event at
    or past the cutoff, nothing later counts, even if its clock said otherwise."""

    replay: CardReplay
    cutoff: datetime
    done: bool = False

    def apply(self, event: RecordedEvent) -> None:
        if self.done or effective_at(event) >= self.cutoff:
            self.done = True
            return
        _, failures = self.replay.apply(event)
        if self.replay.broken:
            raise LedgerInconsistent(f"{failures[0].line()}; run giftcard audit verify")


def _close_card(
    card_until: _CardUntil | None, result: LiabilitiesResult, on_card: Callable[[CardLiability], None] | None
) -> None:
    replay = None if card_until is None else card_until.replay
    if replay is None or replay.card is None or replay.last_event is None or replay.card.balance == 0:
        return
    card = replay.card
    liability = CardLiability(
        card_id=replay.stream_id,
        currency=card.currency,
        balance=card.balance,
        version=replay.last_event.version,
        issued_at=card.issued_at,
        expiring_date=card.expiring_date,
    )
    result.add(liability)
    if on_card is not None:
        on_card(liability)


class LiabilityFile:
    """The per-card rows of ``export liabilities``, as CSV or JSON Lines (amounts exact, in major units),
    written to ``PATH.partial`` and renamed to ``PATH`` only by ``commit``."""

    def __init__(self, path: Path, file_format: str) -> None:
        if file_format not in LIABILITY_FORMATS:
            raise ValueError(f"format must be one of {', '.join(LIABILITY_FORMATS)}; got {file_format!r}")
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        csv_file = file_format == "csv"
        self.writer = _CsvWriter(self.partial, LIABILITY_COLUMNS) if csv_file else _JsonLinesWriter(self.partial)

    def write(self, card: CardLiability) -> None:
        values = {name: getattr(card, name) for name in LIABILITY_COLUMNS}
        values["balance"] = major(card.balance, card.currency)
        self.writer.write_values([values])

    def commit(self) -> None:
        self.writer.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.writer.close()
        self.partial.unlink(missing_ok=True)


def render_liabilities(result: LiabilitiesResult) -> dict[str, Any]:
    return {
        "asOf": result.as_of.isoformat(),
        "cutoff": result.cutoff.isoformat(),
        "totals": [
            {"currency": currency, "cards": result.cards[currency], "outstanding": major(units, currency)}
            for currency, units in sorted(result.outstanding.items())
        ],
    }
