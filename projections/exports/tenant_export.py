"""A tenant's export (``giftcard tenants export``), and its check from the files alone
(``giftcard audit verify --from DIR``).

The folder holds one CSV file per table of the store's data (``TENANT_TABLES``), exactly as
PostgreSQL's ``COPY ... csv header`` writes it (instants in UTC, ``bytea`` as ``\\x`` hex,
``jsonb`` as text), so ``\\copy TABLE from FILE csv header`` loads it back into the same schema;
``tenant.csv`` (its row of ``tenants``: limits, state), ``tenant_log.csv`` (what operators did to
it) and ``manifest.json`` (the account, when, the schema version, each file's rows and SHA-256).
Everything is read in one repeatable-read snapshot, in the tenant's scope and filtered by it.

Secrets stay as they are stored: provider credentials and webhook signing secrets sealed under
``GIFTCARD_SECRET_KEY``, API keys as hashes of their tokens, shoppers' data keys wrapped (and the
events' personal fields sealed under them). So an export is as safe to hand over as a backup.

``events.csv`` is in stream order with each event's hash, so ``verify_export`` re-derives every
stream's hash chain and replays every card through the domain (``projections.audit.replay``),
with no database: one altered, removed or reordered event inside a stream is named.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import asyncpg
import msgspec

from ledger.eventstore.store import recorded_event
from ledger.postgres.tenancy import tenant_scope
from ledger.postgres.tenants import TENANT_TABLES
from projections.audit.auditors import VerifyReport
from projections.audit.replay import CARD_TOPICS, CardReplay, ChainWalk, Failure

MANIFEST = "manifest.json"
EVENTS_FILE = "events.csv"
EXPORT_TIMEOUT_S = 3_600  # a large store's events are one COPY
# One snapshot; instants written in UTC whatever the server's time zone.
_SESSION = f"set local timezone = 'UTC'; set local statement_timeout = '{EXPORT_TIMEOUT_S}s'"
# Streams in code-point order (C collation), which the check can hold the file to without a sort.
_EVENTS = 'select * from events where tenant_id = $1 order by stream_id collate "C", version'
_OPERATOR_TABLES = {"tenant.csv": "tenants where account = $1", "tenant_log.csv": "tenant_log where account = $1"}

RULE_MANIFEST = "export_manifest"
RULE_FILE = "export_file_unchanged"
RULE_ROWS = "export_rows_counted"
RULE_TENANT = "export_holds_one_tenant"
RULE_ORDER = "export_streams_in_order"
RULE_ROW = "export_row_readable"


class ExportedFile(msgspec.Struct, frozen=True):
    rows: int
    sha256: str


class Manifest(msgspec.Struct, frozen=True, rename="camel"):
    account: str
    exported_at: datetime
    schema_version: int
    files: dict[str, ExportedFile]
    verify: str = "giftcard audit verify --from DIR checks events.csv's hash chains and replays its cards"


class ExportFolderRefused(Exception):
    """The output folder is not a new or empty one."""


async def export_tenant(pool: asyncpg.Pool, account: str, folder: Path) -> Manifest:
    """Writes the tenant's export into ``folder`` (new or empty), through a ``folder.partial-*``
    beside it renamed at the end: a failed export never leaves a folder that looks complete."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ExportFolderRefused(f"{folder} exists and is not an empty folder: name a new one")
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-", dir=folder.parent))
    try:
        manifest = await _write_files(pool, account, partial)
        (partial / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")
        os.replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


async def _write_files(pool: asyncpg.Pool, account: str, folder: Path) -> Manifest:
    queries = {f"{table}.csv": f"select * from {table} where tenant_id = $1" for table in TENANT_TABLES}
    queries |= {EVENTS_FILE: _EVENTS}
    queries |= {name: f"select * from {source}" for name, source in _OPERATOR_TABLES.items()}
    # The filter by tenant_id stands even where row-level security does not (a superuser's session).
    with tenant_scope(account):
        async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
            await connection.execute(_SESSION)
            files = {name: await _copy_out(connection, sql, account, folder / name) for name, sql in queries.items()}
            exported_at = await connection.fetchval("select clock_timestamp()")
            schema_version = await connection.fetchval("select max(version) from schema_migrations")
    return Manifest(account, exported_at, schema_version, files)


async def _copy_out(connection: asyncpg.Connection, sql: str, account: str, path: Path) -> ExportedFile:
    digest = hashlib.sha256()
    with path.open("wb") as file:

        async def write(chunk: bytes) -> None:
            digest.update(chunk)
            file.write(chunk)

        status = await connection.copy_from_query(
            sql, account, output=write, format="csv", header=True, timeout=EXPORT_TIMEOUT_S
        )
    return ExportedFile(rows=int(status.rsplit(" ", 1)[1]), sha256=digest.hexdigest())


# ---- the check, from the files alone -------------------------------------------------------------


def verify_export(
    folder: Path, on_failure: Callable[[Failure], None] | None = None
) -> tuple[Manifest | None, VerifyReport]:
    """Every file as the manifest says (unchanged, rows counted), every event the exported tenant's,
    every stream's hash chain and every card's domain replay; every failure named in the report."""
    report = VerifyReport()

    def found(failure: Failure) -> None:
        report.add(failure)
        if on_failure is not None:
            on_failure(failure)

    try:
        manifest = msgspec.json.decode((folder / MANIFEST).read_bytes(), type=Manifest)
    except (OSError, msgspec.MsgspecError) as e:
        found(_export_failure(RULE_MANIFEST, f"{folder / MANIFEST} cannot be read: {e}"))
        return None, report
    for name, expected in manifest.files.items():
        actual = _sha256(folder / name)
        if actual != expected.sha256:
            why = "is missing" if actual is None else "differs from the one exported (its SHA-256 changed)"
            found(_export_failure(RULE_FILE, f"{name} {why}"))
    if EVENTS_FILE not in manifest.files:
        found(_export_failure(RULE_MANIFEST, f"the manifest names no {EVENTS_FILE}"))
        return manifest, report
    if (folder / EVENTS_FILE).exists():
        _walk_events(folder / EVENTS_FILE, manifest, report, found)
    return manifest, report


def _walk_events(path: Path, manifest: Manifest, report: VerifyReport, found: Callable[[Failure], None]) -> None:
    chain: ChainWalk | None = None
    replay: CardReplay | None = None
    stream_id: str | None = None
    for record, row in enumerate(_event_rows(path), start=1):
        try:
            event = recorded_event(_as_stored(row), metadata={})
        except (KeyError, ValueError, msgspec.MsgspecError) as e:  # msgspec's decode errors are ValueErrors too
            found(_export_failure(RULE_ROW, f"{EVENTS_FILE} record {record} is not an event: {e}"))
            continue
        if event.tenant != manifest.account:
            found(Failure(event.stream_id, event.version, event.position, RULE_TENANT, f"an event of {event.tenant!r}"))
        if event.stream_id != stream_id:
            if stream_id is not None and event.stream_id < stream_id:
                found(Failure(event.stream_id, event.version, event.position, RULE_ORDER, "streams out of order"))
            stream_id, chain, replay = event.stream_id, ChainWalk(), None
            report.streams += 1
        assert chain is not None
        for failure in chain.check(event):
            found(failure)
        if replay is None and event.name in CARD_TOPICS:
            replay = CardReplay(event.stream_id)
            report.cards += 1
        if replay is not None:
            for failure in replay.apply(event)[1]:
                found(failure)
        report.events += 1
    if report.events != manifest.files[EVENTS_FILE].rows:
        found(
            _export_failure(
                RULE_ROWS,
                f"{EVENTS_FILE} holds {report.events} event(s), the manifest {manifest.files[EVENTS_FILE].rows}",
            )
        )


def _event_rows(path: Path) -> Iterator[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)  # an event's data is one field
    with path.open(newline="", encoding="utf-8") as file:
        yield from csv.DictReader(file)


def _as_stored(row: dict[str, str]) -> dict[str, object]:
    """A row of events.csv as ``recorded_event`` reads a database row."""
    return {
        **row,
        "position": int(row["position"]),
        "source": int(row["source"]),
        "seq": int(row["seq"]),
        "version": int(row["version"]),
        "recorded_at": datetime.fromisoformat(row["recorded_at"]),
        "hash": bytes.fromhex(row["hash"].removeprefix("\\x")),
    }


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _export_failure(rule: str, message: str) -> Failure:
    return Failure(None, None, None, rule, message)
