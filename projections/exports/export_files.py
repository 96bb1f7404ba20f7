"""Finance exports, read straight from the events (not the lagging read models), streamed.

``export_transactions`` writes one row per transaction, settlement and cancellation, oldest
first, native and forwarded to external providers, as CSV, JSON Lines or Parquet. The rows are
defined once, in SQL (``_ROWS``), inside one read-only repeatable-read transaction (a consistent
snapshot): CSV is ``COPY``'d out of the server as it formats it, JSON Lines and Parquet read the
same rows through a server-side cursor, in batches of ``batch_rows``; memory stays flat however
large the ledger. It adds up what it writes into the same ``Totals`` that ``audit verify``
computes from its replay.

``export_liabilities`` replays every card through the domain up to the end of a day (UTC,
effective time) and yields what each owes then (``projections.finance.liability``: nothing once
it has expired), with the total per currency.

Amounts are exact decimals in major units of ``currency``: strings in CSV and JSON Lines,
``decimal128(38, 4)`` in Parquet (10^-4 is the finest minor unit of any ISO 4217 currency the
ledger supports, so every amount fits exactly; ``currency`` says how many decimals count).
An external provider's currency is not recorded by the hub: ``currency`` is empty there.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import asyncpg
import msgspec

from ledger.domain.giftcard import CREDIT, DEBIT
from ledger.domain.money import CURRENCY_EXPONENTS
from ledger.domain.topics import stored_types
from ledger.eventstore.store import RecordedEvent
from projections import events as ev
from projections.audit.replay import (
    CANCELLATION,
    CARD_STORED_TYPES,
    EVENT_COLUMNS,
    SETTLEMENT,
    TRANSACTION,
    CardReplay,
    cursor_batches,
    effective_at,
    read_event,
)
from projections.exports.totals import TotalKey, Totals, major
from projections.finance.liability import card_liability
from projections.forwarded import FORWARDED_REPLAYS_CTE

EXPORT_BATCH_ROWS = 2_000  # rows per cursor fetch, and rows per Parquet row group at most
CSV_SLICE_BYTES_MAX = 64 * 1024  # of a COPY chunk, rewritten (LF to CRLF) and written at a time
FORMATS = ("csv", "jsonl", "parquet")
LIABILITY_FORMATS = ("csv", "jsonl")
PARQUET_AMOUNT_PRECISION = 38
PARQUET_AMOUNT_SCALE = ev.UNKNOWN_CURRENCY_EXPONENT  # 4: the finest minor unit of any supported currency

# a void: a cancellation
_NATIVE_MONEY_TOPICS = stored_types(ev.CREDITED, ev.DEBITED, ev.SETTLED, ev.CANCELLED, ev.VOIDED)
_CREATES = ev.sql_types(ev.CREDITED, ev.DEBITED)
_MONEY_OPERATIONS = [ev.FORWARDED_CREATE_TRANSACTION, ev.FORWARDED_SETTLE, ev.FORWARDED_CANCEL]

_CARD_EVENTS = f"select {EVENT_COLUMNS} from events e where e.type = any($1::text[]) order by e.stream_id, e.version"


# ---- the rows, defined once, in SQL ------------------------------------------------------------
#
# Every format reads these rows: CSV straight out of ``COPY ... TO STDOUT`` (the server formats every
# field, exact decimals, UTC instants as Python's ``isoformat`` writes them, and this process only moves
# bytes), JSON Lines and Parquet through a cursor. $1 native money topics, $2 forwarded money operations,
# $3 since (inclusive), $4 until (exclusive), $5 provider, $6 the native provider's id, $7 currency.
# Effective time: the event's date, else when it was recorded.
#
# A field of the wrong JSON type cannot give an exact row: a native amount must be a JSON number
# (``->`` cast to bigint refuses a string, where ``->>`` would read "12" as 12); the query then fails with
# a DataError, reported as LedgerInconsistent. A fractional number would be rounded by that cast, and a
# forwarded ``value`` is read as ASCII decimal text only (``Decimal()`` also reads "1_000" and non-ASCII
# digits); text fields are read as text whatever their JSON type. None of these can be written by the
# ledger (the domain's codec writes integers and strings; the hub writes ``str(Decimal)``, ASCII without
# underscores); an altered native event of that kind is named by ``audit verify``, whose replay refuses it.
_AMOUNT_UNITS_MAX = ev.UNKNOWN_CURRENCY_AMOUNT_MAX
_DECIMAL_TEXT = r"^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?\s*$"  # as Decimal() reads one
_ROWS = f"""
with {FORWARDED_REPLAYS_CTE},
money as not materialized (  -- read twice (native, forwarded): two scans cost less than a spilled copy
    select e.position, e.stream_id, e.type, e.data, e.recorded_at
    from events e
    where (e.type = any($1::text[])
           or (e.type = '{ev.FORWARDED}' and e.data->>'outcome' = '{ev.FORWARDED_OK}'
               and e.data->>'operation' = any($2::text[])
               and e.position not in (select position from forwarded_replays)))
      and ($3::timestamptz is null or coalesce((e.data->>'date')::timestamptz, e.recorded_at) >= $3)
      and ($4::timestamptz is null or coalesce((e.data->>'date')::timestamptz, e.recorded_at) < $4)
      and ($5::text is null or case when e.type = '{ev.FORWARDED}' then e.data->>'providerId' = $5 else $5 = $6 end)
),
-- Each card's currency, and the operation of every transaction a settlement or cancellation names
-- (its latest create, as the domain keeps it): looked up by hash, not through an index per row.
issues as (
    select stream_id, data->>'currency' as currency from events where version = 1 and type in ({ev.sql_types(ev.ISSUED)})
),
directions as (
    select distinct on (c.stream_id, c.data->>'transaction_id')
           c.stream_id, c.data->>'transaction_id' as transaction_id, c.type
    from events c where c.type in ({_CREATES})
    order by c.stream_id, c.data->>'transaction_id', c.version desc
),
native as (
    select m.position, coalesce((m.data->>'date')::timestamptz, m.recorded_at) as date, m.recorded_at,
           $6::text as provider, 'ledger' as source, m.stream_id as card_id,
           m.data->>'transaction_id' as transaction_id,
           case when m.type in ({_CREATES}) then '{TRANSACTION}'
                when m.type in ({ev.sql_types(ev.SETTLED)}) then '{SETTLEMENT}' else '{CANCELLATION}' end as kind,
           case when coalesce(t.type, m.type) in ({ev.sql_types(ev.CREDITED)}) then '{CREDIT}'
                when coalesce(t.type, m.type) in ({ev.sql_types(ev.DEBITED)}) then '{DEBIT}' end as operation,
           m.data->>'oid' as oid, i.currency,
           (m.data->'value')::bigint as amount, (m.data->'released')::bigint as released,
           (m.data->'refunded')::bigint as refunded, m.data->>'request_id' as request_id,
           m.data->'order_info'->>'orderId' as order_id,
           case when m.type in ({_CREATES}) then coalesce(m.data->>'description', '') end
               as description
    from money m
    left join issues i on i.stream_id = m.stream_id
    left join directions t  -- a create needs no lookup: its key is null, so it is not even hashed
        on t.stream_id = m.stream_id
           and t.transaction_id = case when m.type not in ({_CREATES})
                                       then m.data->>'transaction_id' end
    where m.type <> '{ev.FORWARDED}'
),
forwarded as (
    select m.position, m.recorded_at as date, m.recorded_at, m.data->>'providerId' as provider,
           'forwarded' as source, m.data->>'cardId' as card_id,
           case when f.is_create then coalesce(m.data->>'transactionId', m.stream_id) else m.data->>'transactionId' end
               as transaction_id,
           case m.data->>'operation' when '{ev.FORWARDED_CREATE_TRANSACTION}' then '{TRANSACTION}'
                when '{ev.FORWARDED_SETTLE}' then '{SETTLEMENT}' else '{CANCELLATION}' end as kind,
           null as operation, case when not f.is_create then m.stream_id end as oid, null as currency,
           (u.scaled)::bigint as amount, null::bigint as released, null::bigint as refunded,
           case when f.is_create then nullif(btrim(coalesce(m.data->>'requestId', ''), E' \\t\\n\\r\\f\\v'), '')
                else m.data->>'requestId' end as request_id,
           null as order_id, null as description
    from money m
    cross join lateral (
        select m.data->>'operation' = '{ev.FORWARDED_CREATE_TRANSACTION}' as is_create,
               case when m.data->>'value' ~ '{_DECIMAL_TEXT}' then (m.data->>'value')::numeric end as major
    ) f
    cross join lateral (select f.major * {10**ev.UNKNOWN_CURRENCY_EXPONENT} as scaled) u  -- numeric: exact
    where m.type = '{ev.FORWARDED}' and m.data->>'cardId' is not null
      and (f.is_create or m.data->>'transactionId' is not null)
      and f.major > 0 and f.major <= {_AMOUNT_UNITS_MAX} and u.scaled = trunc(u.scaled) and u.scaled <= {_AMOUNT_UNITS_MAX}
)
select * from (select * from native union all select * from forwarded) r
where $7::text is null or r.currency = $7 or (r.source = 'ledger' and r.currency is null)
"""

# JSON Lines and Parquet: the rows, oldest first (a card with no issue event has no currency, and is
# kept whatever the currency filter so that the export stops on it).
_ROWS_IN_ORDER = f"select * from ({_ROWS}) r order by r.position"


def _iso_sql(column: str) -> str:
    """A UTC instant as Python's ``isoformat`` writes it (microseconds only when there are any):
    one ``to_char`` a value, the costliest function of the export."""
    return (
        f"""replace(to_char({column} at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), '.000000', '') """
        "|| '+00:00'"
    )


def _major_sql(column: str) -> str:
    """Units as ``totals.major`` writes them: the currency's decimals, or (no currency) no trailing zeros.
    ``r.unit`` is 10^-exponent with exactly ``exponent`` decimals (USD: 0.01), so the product has them too."""
    return f"case when r.currency is null then trim_scale({column} * 0.0001)::text else ({column} * r.unit)::text end"


# JIT compiling these long expressions costs more than it saves, over a ledger of any size; the rows are
# sorted by position before the first byte is sent, which takes longer than any one ledger statement may.
EXPORT_TIMEOUT_S = 3_600
_READ_ONLY = {"isolation": "repeatable_read", "readonly": True}  # one consistent snapshot, no transaction id
_SESSION = f"set local jit = off; set local statement_timeout = '{EXPORT_TIMEOUT_S}s'; set local work_mem = '64MB'"

# CSV writes None and "" alike (an empty field); COPY quotes "" unless it is NULL, hence the nullifs.
# The rows are sorted before they are formatted: narrower rows to sort (the sort spills to disk).
_CSV_COPY = f"""
select r.position, {_iso_sql("r.date")} as date, {_iso_sql("r.recorded_at")} as recorded_at,
       nullif(r.provider, '') as provider, r.source, nullif(r.card_id, '') as card_id,
       nullif(r.transaction_id, '') as transaction_id, r.kind, r.operation, nullif(r.oid, '') as oid, r.currency,
       {_major_sql("r.amount")} as amount, {_major_sql("r.released")} as released,
       {_major_sql("r.refunded")} as refunded, nullif(r.request_id, '') as request_id,
       nullif(r.order_id, '') as order_id, nullif(r.description, '') as description
from (
    select r.*, x.unit from ({_ROWS}) r
    left join unnest($8::text[], $9::numeric[]) as x(currency, unit) on x.currency = r.currency
    order by r.position
) r
order by r.position
"""


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
    if file_format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {file_format!r}")
    partial = output.with_name(output.name + ".partial")
    args = (
        _NATIVE_MONEY_TOPICS,
        _MONEY_OPERATIONS,
        where.since,
        where.until,
        where.provider,
        native_provider_id,
        where.currency,
    )
    try:
        if file_format == "csv":
            result = await _export_csv(pool, partial, args, on_progress)
        else:
            result = await _export_rows(pool, partial, file_format, args, batch_rows, on_progress)
    except asyncpg.DataError as e:  # a field that is not what its event type says (a value that is no integer)
        partial.unlink(missing_ok=True)
        raise LedgerInconsistent(f"an event does not decode: {e}; run giftcard audit verify") from e
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)
    return result


async def _export_rows(
    pool: asyncpg.Pool,
    path: Path,
    file_format: str,
    args: tuple[object, ...],
    batch_rows: int,
    on_progress: Callable[[int], None] | None,
) -> ExportResult:
    """JSON Lines or Parquet: ``_ROWS_IN_ORDER`` through a cursor, a batch at a time, added up here."""
    result = ExportResult()
    writer = _writer(file_format, path)
    try:
        async with pool.acquire() as connection, connection.transaction(**_READ_ONLY):
            await connection.execute(_SESSION)
            async for batch in cursor_batches(connection, _ROWS_IN_ORDER, args, batch_rows):
                rows = [_export_row(record) for record in batch]
                writer.write(rows)
                for row in rows:
                    result.totals.add(TotalKey(row.provider, row.currency, row.kind, row.operation), row.amount)
                result.rows += len(rows)
                if on_progress is not None:
                    on_progress(len(rows))
    finally:
        writer.close()
    return result


def _export_row(record: asyncpg.Record) -> ExportRow:
    if record["source"] == "ledger" and record["currency"] is None:
        raise LedgerInconsistent(_not_issued(record["card_id"]))
    return ExportRow(**dict(record.items()))


def _not_issued(card_id: str) -> str:
    return f"card {card_id} has money events but no issue event; run giftcard audit verify"


async def _export_csv(
    pool: asyncpg.Pool, path: Path, args: tuple[object, ...], on_progress: Callable[[int], None] | None
) -> ExportResult:
    """``COPY`` of ``_CSV_COPY`` into ``path``, added up here as it passes (``_CsvCopy``): the server
    formats and this process, on the other core, only splits and sums what it writes."""
    currencies = sorted(CURRENCY_EXPONENTS)
    units = [Decimal(1).scaleb(-CURRENCY_EXPONENTS[currency]) for currency in currencies]
    async with pool.acquire() as connection, connection.transaction(**_READ_ONLY):
        await connection.execute(_SESSION)
        with path.open("wb") as file:
            copy = _CsvCopy(file, on_progress)
            await connection.copy_from_query(
                _CSV_COPY,
                *args,
                currencies,
                units,
                output=copy.write,
                format="csv",
                header=True,
                timeout=EXPORT_TIMEOUT_S,
            )
    return copy.finish()


_TOTALLED_FIELDS = itemgetter(
    *(COLUMNS.index(name) for name in ("provider", "source", "card_id", "kind", "operation", "currency", "amount"))
)


class _CsvCopy:
    """Writes COPY's CSV as every CSV export before it (Python's csv module) did, and adds it up.

    COPY ends records with LF, the csv module with CRLF; a LF inside a quoted field is data and
    stays. Chunks arrive cut anywhere, so each is processed up to its last record end (the rest
    waits for the next chunk): complete records are rewritten, written, and read back with the
    csv module for the totals.
    """

    def __init__(self, file: IO[bytes], on_progress: Callable[[int], None] | None) -> None:
        self.file = file
        self.on_progress = on_progress
        self.pending = b""  # the start of a record whose end has not arrived
        self.header = True
        self.result = ExportResult()
        self.card_not_issued: str | None = None

    async def write(self, chunk: bytes) -> None:
        # Sliced, so that the copies made here stay small however fast the rows arrive.
        for start in range(0, len(chunk), CSV_SLICE_BYTES_MAX):
            self._take(chunk[start : start + CSV_SLICE_BYTES_MAX])

    def finish(self) -> ExportResult:
        if self.pending:
            raise LedgerInconsistent("the export ended inside a record; run giftcard audit verify")
        if self.card_not_issued is not None:
            raise LedgerInconsistent(_not_issued(self.card_not_issued))
        return self.result

    def _take(self, data: bytes) -> None:
        data = self.pending + data
        parts = data.split(b'"')  # every other part is inside quotes, starting outside
        outside = range(len(parts) - 1 - (len(parts) - 1) % 2, -1, -2)  # from the last part outside quotes
        last = next((i for i in outside if b"\n" in parts[i]), None)
        if last is None:
            self.pending = data
            return
        cut = sum(map(len, parts[:last])) + last + parts[last].rindex(b"\n") + 1
        complete, self.pending = data[:cut], data[cut:]
        records = complete.split(b'"')
        for i in range(0, len(records), 2):
            records[i] = records[i].replace(b"\n", b"\r\n")
        self.file.write(b'"'.join(records))
        self._add_up(complete.decode())

    def _add_up(self, text: str) -> None:
        rows = csv.reader(io.StringIO(text))
        if self.header:
            next(rows)
            self.header = False
        counts: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)  # this block's, by total key
        sums: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)
        for row in rows:
            provider, source, card_id, kind, operation, currency, amount = _TOTALLED_FIELDS(row)
            if not currency:
                if source == "ledger" and self.card_not_issued is None:
                    self.card_not_issued = card_id
                units = int(Decimal(amount).scaleb(ev.UNKNOWN_CURRENCY_EXPONENT))
            else:
                units = int(amount.replace(".", ""))  # written with exactly the currency's decimals
            key = (provider, currency, kind, operation)
            counts[key] += 1
            sums[key] += units
        for (provider, currency, kind, operation), count in counts.items():
            key = TotalKey(provider, currency or None, kind, operation or None)
            self.result.totals.add_many(key, count, sums[provider, currency, kind, operation])
        added = sum(counts.values())
        self.result.rows += added
        if self.on_progress is not None and added:
            self.on_progress(added)


async def count_export_events(pool: asyncpg.Pool) -> int:
    """An upper bound of the events an export reads, for a progress bar's total."""
    types = [*_NATIVE_MONEY_TOPICS, ev.FORWARDED]
    return await pool.fetchval("select count(*) from events where type = any($1::text[])", types)


async def count_card_events(pool: asyncpg.Pool) -> int:
    """The events ``export_liabilities`` reads, for a progress bar's total."""
    return await pool.fetchval("select count(*) from events where type = any($1::text[])", CARD_STORED_TYPES)


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


def _writer(file_format: str, path: Path) -> _JsonLinesWriter | _ParquetWriter:
    """JSON Lines or Parquet (CSV comes out of ``COPY``, see ``_export_csv``)."""
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
    """Every card that owes something at the end of ``as_of`` (UTC), replayed through the domain one at a
    time in (card, version) order; raises LedgerInconsistent if a card cannot be replayed."""
    result = LiabilitiesResult(as_of, end_of_day(as_of))
    card: _CardUntil | None = None
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        async for batch in cursor_batches(connection, _CARD_EVENTS, (CARD_STORED_TYPES,), batch_rows):
            for row in batch:
                event = read_event(row)
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
    if replay is None or replay.card is None or replay.last_event is None:
        return
    card = replay.card
    owed = card_liability(card, card_until.cutoff)
    if owed == 0:
        return
    liability = CardLiability(
        card_id=replay.stream_id,
        currency=card.currency,
        balance=owed,
        version=replay.last_event.version,
        issued_at=card.issued_at,
        expiring_date=card.expiring_date,
    )
    result.add(liability)
    if on_card is not None:
        on_card(liability)


class LiabilityFile:
    """The per-card rows of ``export liabilities`` (or another per-card report: ``columns``, with its
    amount in ``amount``), as CSV or JSON Lines (amounts exact, in major units), written to
    ``PATH.partial`` and renamed to ``PATH`` only by ``commit``."""

    def __init__(
        self, path: Path, file_format: str, columns: list[str] = LIABILITY_COLUMNS, amount: str = "balance"
    ) -> None:
        if file_format not in LIABILITY_FORMATS:
            raise ValueError(f"format must be one of {', '.join(LIABILITY_FORMATS)}; got {file_format!r}")
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.columns, self.amount = columns, amount
        csv_file = file_format == "csv"
        self.writer = _CsvWriter(self.partial, columns) if csv_file else _JsonLinesWriter(self.partial)

    def write(self, card: Any) -> None:
        values = {name: getattr(card, name) for name in self.columns}
        values[self.amount] = major(values[self.amount], card.currency)
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
