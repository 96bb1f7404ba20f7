"""The auditors: one card's history replayed step by step, and ``verify`` over the whole ledger.

``audit_card`` reads one card's stream, checks its hash chain, replays it through the domain
and keeps every step with the balance after it, plus the card as it stood at an instant
(effective time: the ledger's clock inside each event, which the hash chain covers).

``verify`` walks every stream in (stream_id, version) order through one server-side cursor,
in batches of ``batch_events_max``, inside one read-only repeatable-read transaction (a
consistent snapshot that takes no transaction id, so it never holds back the projection
runners). The streams may be split into shares of about as many events, each but the first
walked by a process of its own in the snapshot verify exports (the replay is CPU-bound Python);
what spans every card is compared once, when every share is in. Only the current stream's state
is in memory. For each stream it checks versions and the hash chain; for a card, replays it and checks the invariants after every event; it
compares every read model with that replay (``projections.audit.read_models``) and adds up
the money moved into the same totals ``export transactions`` computes. A card's snapshot (the
cache the ledger loads long histories from) must equal the replay at its version, byte for byte.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec

from ledger.application.commands import parse_card_id
from ledger.domain.errors import CardNotFound
from ledger.domain.giftcard import Transaction
from ledger.domain.money import to_major
from ledger.domain.snapshot import decode_snapshot, restore_snapshot
from ledger.eventstore.commit_order import Checkpoint
from ledger.eventstore.store import EventStore, RecordedEvent
from ledger.postgres.database import connect_options
from ledger.postgres.personal_data import snapshot_of
from ledger.postgres.tenancy import current_scope
from projections import events as ev
from projections.audit.read_models import (
    CARDS_PER_CHECK_MAX,
    ReadModelCheck,
    ReadModelResult,
    ShareFigures,
    load_checkpoints,
)
from projections.audit.replay import (
    CARD_TOPICS,
    EVENT_COLUMNS,
    RULE_REPLAY,
    BalanceFigures,
    CardReplay,
    ChainWalk,
    Failure,
    Step,
    balance_figures,
    cursor_batches,
    effective_at,
    read_decoded,
    short_type,
)
from projections.exports.totals import TotalKey, Totals
from projections.forwarded import FORWARDED_REPLAYS_CTE, forwarded_move

VERIFY_BATCH_EVENTS = 5_000  # a round trip per batch; the next batch is read while this one is walked
FAILURES_KEPT_MAX = 1_000  # in the report; every failure is still passed to on_failure and counted

RULE_SNAPSHOT = "snapshot_matches_replay"
SNAPSHOTS_ORPHANED_NAMED_MAX = 10  # snapshots of a version no event has, named in the report

# The replay is CPU-bound Python: the streams are split into this many shares of about as many events,
# each walked by a process of its own (the first by verify's), all in one snapshot exported by verify.
VERIFY_WALKERS_MAX = 2
# What verify's own process walks while a walker process starts (spawn, imports, connection): its share is
# larger by this many events (at most a quarter of a share), so that every share ends at about the same time.
_WALKER_START_EVENTS = 20_000
_SESSION = "set local jit = off"  # compiling the walk's query costs more than it saves

# Every event of a share of the streams in (stream_id, version) order (the unique index's: no sort), with
# whether it is a forwarded replay (not counted again, see projections.forwarded) and, at the version the
# stream's snapshot was taken, that snapshot (read in the same pass: no query per card). {where} bounds
# the share's stream ids.
_VERIFY_EVENTS = f"""
with {FORWARDED_REPLAYS_CTE}
select {EVENT_COLUMNS}, e.position in (select position from forwarded_replays) as forwarded_replay,
       s.hash as snapshot_hash, s.state as snapshot_state
from events e
left join snapshots s on s.stream_id = e.stream_id and s.version = e.version
{{where}}
order by e.stream_id, e.version
"""

# The stream id at a given event of the (stream_id, version) order: where a share of the walk begins.
_SHARE_START = "select stream_id from events order by stream_id, version offset $1 limit 1"


@dataclass(frozen=True)
class _Share:
    """Streams from ``first`` (inclusive) to ``end`` (exclusive); None: from the first, to the last."""

    first: str | None = None
    end: str | None = None

    def query(self) -> tuple[str, tuple[str, ...]]:
        bounds = [(op, v) for op, v in ((">=", self.first), ("<", self.end)) if v is not None]
        where = " and ".join(f"e.stream_id {op} ${n}" for n, (op, _) in enumerate(bounds, start=1))
        return _VERIFY_EVENTS.format(where=f"where {where}" if where else ""), tuple(v for _, v in bounds)


_ORPHANED_SNAPSHOTS = """
select s.stream_id, s.version from snapshots s
where not exists (select 1 from events e where e.stream_id = s.stream_id and e.version = s.version)
order by s.stream_id limit $1
"""


# ---- one card --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardState:
    """A card as it stood after ``version`` (figures only, in minor units)."""

    version: int
    balances: BalanceFigures
    transactions: list[Transaction]


@dataclass(frozen=True)
class AuditEntry:
    event: RecordedEvent
    effective_at: datetime
    step: Step | None  # None once the replay broke: the event is listed, not applied
    after_as_of: bool


@dataclass(frozen=True)
class CardAudit:
    card_id: str
    currency: str | None
    as_of: datetime | None
    entries: list[AuditEntry]
    state: CardState | None  # at as_of (the latest state without one); None: no card yet then
    failures: list[Failure]


async def audit_card(store: EventStore, card_id: str, as_of: datetime | None = None) -> CardAudit:
    """A card's whole history, replayed and checked; raises CardNotFound when no card has that id."""
    stream_id = parse_card_id(card_id)
    events = await store.read_stream(stream_id)
    if not any(event.name in CARD_TOPICS for event in events):  # not first only: its issue may be the one removed
        raise CardNotFound(f"gift card {card_id!r} not found")
    chain, replay = ChainWalk(), CardReplay(stream_id)
    entries: list[AuditEntry] = []
    failures: list[Failure] = []
    state: CardState | None = None
    reached_as_of = False
    for event in events:
        at = effective_at(event)
        after = reached_as_of or (as_of is not None and at > as_of)  # a stream is cut once, as a prefix
        if after and not reached_as_of:
            state, reached_as_of = _state_of(replay), True
        failures += chain.check(event)
        step, broken = replay.apply(event)
        failures += broken
        entries.append(AuditEntry(event, at, step, after))
    if not reached_as_of:
        state = _state_of(replay)
    return CardAudit(stream_id, replay.currency, as_of, entries, state, failures)


def _state_of(replay: CardReplay) -> CardState | None:
    if replay.card is None or replay.last_event is None:
        return None
    transactions = [msgspec.structs.replace(t) for t in replay.card.transactions.values()]
    return CardState(replay.last_event.version, balance_figures(replay.card), transactions)


def render_card_audit(audit: CardAudit, provider: str) -> dict[str, Any]:
    """The JSON document the CLI prints and the HTTP API answers (amounts in major units)."""
    currency = audit.currency
    return {
        "cardId": audit.card_id,
        "provider": provider,
        "currency": currency,
        "asOf": None if audit.as_of is None else iso(audit.as_of),
        "valid": not audit.failures,
        "failures": [render_failure(f) for f in audit.failures],
        "state": None if audit.state is None or currency is None else _render_state(audit.state, currency),
        "events": [_render_entry(entry, currency) for entry in audit.entries],
    }


def _render_state(state: CardState, currency: str) -> dict[str, Any]:
    figures = state.balances
    return {
        "version": state.version,
        "balance": to_major(figures.available, currency),
        "authorized": to_major(figures.authorized, currency),
        "settled": to_major(figures.settled, currency),
        "credited": to_major(figures.credited, currency),
        "debited": to_major(figures.debited, currency),
        "transactions": [_render_transaction(t, currency) for t in state.transactions],
    }


def _render_transaction(transaction: Transaction, currency: str) -> dict[str, Any]:
    return {
        "id": transaction.id,
        "operation": transaction.operation,
        "date": _iso_or_as_written(transaction.date),
        "value": to_major(transaction.value, currency),
        "settled": to_major(transaction.settled, currency),
        "released": to_major(transaction.released, currency),
        "refunded": to_major(transaction.refunded, currency),
        "held": to_major(transaction.held, currency),
    }


def _render_entry(entry: AuditEntry, currency: str | None) -> dict[str, Any]:
    event, step = entry.event, entry.step

    def amount(minor: int | None) -> Decimal | None:
        return None if minor is None or currency is None else to_major(minor, currency)

    rendered: dict[str, Any] = {
        "version": event.version,
        "position": event.position,
        "type": short_type(event.type),
        "effectiveAt": iso(entry.effective_at),
        "recordedAt": iso(event.recorded_at),
        "hash": event.hash.hex(),
        "afterAsOf": entry.after_as_of,
        "applied": step is not None,
    }
    if step is not None:
        transaction = step.transaction
        rendered |= {
            "kind": step.kind,
            "transactionId": None if transaction is None else transaction.id,
            "operation": None if transaction is None else transaction.operation,
            "amount": amount(step.amount),
            "released": amount(step.released),
            "refunded": amount(step.refunded),
            "balance": amount(step.balance),
        }
    return rendered


def render_failure(failure: Failure) -> dict[str, Any]:
    return {
        "streamId": failure.stream_id,
        "version": failure.version,
        "position": failure.position,
        "rule": failure.rule,
        "message": failure.message,
    }


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso_or_as_written(value: str) -> str:
    """A date from an event; one that does not parse (an altered event) is shown as it was written."""
    try:
        return iso(ev.instant(value))
    except ValueError:
        return value


# ---- the whole ledger ------------------------------------------------------------------------


@dataclass
class VerifyReport:
    events: int = 0
    streams: int = 0
    cards: int = 0
    failures: list[Failure] = field(default_factory=list)  # the first FAILURES_KEPT_MAX
    failures_total: int = 0
    totals: Totals = field(default_factory=Totals)
    read_models: list[ReadModelResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failures_total == 0

    def add(self, failure: Failure) -> None:
        self.failures_total += 1
        if len(self.failures) < FAILURES_KEPT_MAX:
            self.failures.append(failure)


class _StreamWalk:
    """One stream of the verify walk: chain always; for a card, the domain replay, its snapshot and the
    money it moved; for a forwarded call, the money it moved. Never touches the connection: what needs
    a query waits in ``models`` until the walk is between two batches."""

    def __init__(
        self, stream_id: str, native: str, report: VerifyReport, models: ReadModelCheck, found: Callable
    ) -> None:
        self.stream_id = stream_id
        self.native = native
        self.report = report
        self.models = models
        self.found = found
        self.chain = ChainWalk()
        self.replay: CardReplay | None = None

    def apply(self, event: RecordedEvent, state: Any, row: asyncpg.Record) -> None:
        """``state``: the event's data, decoded once for everything that reads it (see ``read_decoded``)."""
        for failure in self.chain.check(event):
            self.found(failure)
        if self.replay is None and event.name in CARD_TOPICS:
            self.replay = CardReplay(self.stream_id)
            self.report.cards += 1
            self.models.card_started(event)
        if self.replay is not None:  # everything in a card's stream goes through the domain
            self._card_event(self.replay, event, state, row["snapshot_hash"], row["snapshot_state"])
        elif event.type == ev.FORWARDED:
            self._forwarded(event, row["forwarded_replay"])
        # Any other stream (the provider registry) is checked for its chain only.

    def _card_event(
        self,
        replay: CardReplay,
        event: RecordedEvent,
        state: Any,
        snapshot_hash: bytes | None,
        snapshot: bytes | None,
    ) -> None:
        self.models.before_card_event(replay, event)
        step, failures = replay.apply(event, state)
        for failure in failures:
            self.found(failure)
        if step is None:
            return
        if snapshot is not None and replay.card is not None:
            for failure in _snapshot_failures(
                event, snapshot_hash, snapshot, snapshot_of(replay.card, replay.card.profile_id)
            ):
                self.found(failure)
        self.models.card_step(replay, step, state)
        transaction = step.transaction
        if step.kind is not None and transaction is not None and step.amount is not None:
            key = TotalKey(self.native, replay.currency, step.kind, transaction.operation)
            self.report.totals.add(key, step.amount)

    def _forwarded(self, event: RecordedEvent, forwarded_replay: bool) -> None:
        try:
            call = ev.decode(event, ev.Forwarded)
            move = forwarded_move(event)
        except msgspec.MsgspecError as e:
            self.found(
                Failure(event.stream_id, event.version, event.position, RULE_REPLAY, f"not a forwarded call: {e}")
            )
            return
        self.models.forwarded(event, call, move, forwarded_replay)
        if move is not None and not forwarded_replay:
            self.report.totals.add(TotalKey(move.provider, None, move.kind, None), move.amount)

    def finish(self) -> None:
        if self.replay is not None:
            self.models.card_done(self.replay)


def _snapshot_failures(
    event: RecordedEvent, stored_hash: bytes | None, stored: bytes, replayed: bytes
) -> list[Failure]:
    """A snapshot is a cache the ledger loads cards from: it must be the replay at its version, exactly,
    every field of it. One of an older schema is never loaded (the ledger rebuilds the card from its
    events), so only its hash is held to account."""
    failures = []
    if stored_hash != event.hash:
        message = "the snapshot's hash is not the stored hash of the event at its version"
        failures.append(Failure(event.stream_id, event.version, event.position, RULE_SNAPSHOT, message))
    difference = _snapshot_difference(stored, replayed)
    if difference is not None:
        message = f"the snapshot differs from the replay at its version: {difference}"
        failures.append(Failure(event.stream_id, event.version, event.position, RULE_SNAPSHOT, message))
    return failures


def _snapshot_difference(stored: bytes, replayed: bytes) -> str | None:
    """What differs between a stored snapshot and the replay's: the balance figures with their amounts,
    then every other field by name only (some hold personal data); None when nothing differs, or when
    the stored one is stale (an older schema, which the ledger does not load)."""
    try:
        held = decode_snapshot(stored)
    except (msgspec.MsgspecError, ValueError) as e:
        return f"it does not decode ({e})"
    expected = decode_snapshot(replayed)
    if held is None or held == expected:
        return None
    figures_held = balance_figures(restore_snapshot(stored))
    figures_expected = balance_figures(restore_snapshot(replayed))
    differing = [
        f"{name} {getattr(figures_held, name)} in the snapshot, {getattr(figures_expected, name)} by replay"
        for name in figures_held.__struct_fields__
        if getattr(figures_held, name) != getattr(figures_expected, name)
    ]
    differing += [
        f"{name} differs" for name in held.__struct_fields__ if getattr(held, name) != getattr(expected, name)
    ]
    return "; ".join(differing)


async def _orphaned_snapshots(connection: asyncpg.Connection) -> list[Failure]:
    rows = await connection.fetch(_ORPHANED_SNAPSHOTS, SNAPSHOTS_ORPHANED_NAMED_MAX)
    return [
        Failure(r["stream_id"], r["version"], None, RULE_SNAPSHOT, "a snapshot of a version no event has") for r in rows
    ]


async def verify(
    pool: asyncpg.Pool,
    native_provider_id: str,
    *,
    batch_events_max: int = VERIFY_BATCH_EVENTS,
    cards_per_check_max: int = CARDS_PER_CHECK_MAX,
    on_failure: Callable[[Failure], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    database_url: str | None = None,
    walkers: int = 1,
) -> VerifyReport:
    """Walks every stream; every failure goes to ``on_failure`` and into the report.

    With ``walkers`` > 1 (and the ``database_url`` a process connects to), the streams are split into
    that many shares, each but the first walked by a process of its own in the snapshot this one
    exports; a share's failures (the first ``FAILURES_KEPT_MAX`` of them, all counted) and progress
    arrive when it is done. What spans every card (daily totals, forwarded totals, rows no event
    explains, orphaned snapshots) is compared here, once, after every share is added.

    Memory, per process: two batches of ``batch_events_max`` events (the one walked, the next one being
    read), one stream's replay, and the expected figures of the cards waiting to be compared with their
    read-model rows (compared between batches, once ``cards_per_check_max`` are waiting).
    """
    if walkers < 1 or walkers > VERIFY_WALKERS_MAX or (walkers > 1 and database_url is None):
        raise ValueError(f"walkers must be 1, or up to {VERIFY_WALKERS_MAX} with a database_url")
    report = VerifyReport()

    def found(failure: Failure) -> None:
        report.add(failure)
        if on_failure is not None:
            on_failure(failure)

    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        await connection.execute(_SESSION)
        checkpoints = await load_checkpoints(connection)
        models = ReadModelCheck(
            connection, native_provider_id, checkpoints, found, cards_per_check_max=cards_per_check_max
        )
        mine, *others = await _shares(connection, walkers)
        with ProcessPoolExecutor(max(len(others), 1), mp_context=multiprocessing.get_context("spawn")) as executor:
            snapshot = await connection.fetchval("select pg_export_snapshot()") if others else None
            # A walker's connection is its own: it reads in the scope of this one (ledger.postgres.tenancy).
            options = (native_provider_id, checkpoints, batch_events_max, cards_per_check_max, current_scope())
            loop = asyncio.get_running_loop()
            walking = [
                loop.run_in_executor(executor, _walk_share, database_url, snapshot, share, *options) for share in others
            ]
            try:
                await _walk(connection, mine, native_provider_id, report, models, found, batch_events_max, on_progress)
            finally:
                shares = await asyncio.gather(*walking)  # before the transaction whose snapshot they share ends
        for share in shares:
            _add_share(report, models, share, found, on_progress)
        for failure in await _orphaned_snapshots(connection):
            found(failure)
        report.read_models = await models.finish()
    return report


async def _shares(connection: asyncpg.Connection, walkers: int) -> list[_Share]:
    """``walkers`` shares of about as many events each (the first larger by ``_WALKER_START_EVENTS``),
    split between streams (a stream is walked whole)."""
    if walkers == 1:
        return [_Share()]
    events = await connection.fetchval("select count(*) from events")
    head_start = min(_WALKER_START_EVENTS, events // walkers // 4)
    offsets = [head_start + (events - head_start) * n // walkers for n in range(1, walkers)]
    starts = [await connection.fetchval(_SHARE_START, offset) for offset in offsets]
    edges = [None, *sorted({start for start in starts if start is not None}), None]
    return [_Share(first, end) for first, end in zip(edges, edges[1:], strict=False)]


async def _walk(
    connection: asyncpg.Connection,
    share: _Share,
    native: str,
    report: VerifyReport,
    models: ReadModelCheck,
    found: Callable[[Failure], None],
    batch_events_max: int,
    on_progress: Callable[[int], None] | None,
) -> None:
    """One share of the streams, event by event; its cards compared with the read models as it goes."""
    walk: _StreamWalk | None = None
    sql, args = share.query()
    async for batch in cursor_batches(connection, sql, args, batch_events_max, between=models.compare_due):
        for row in batch:
            event, state = read_decoded(row)
            if walk is None or walk.stream_id != event.stream_id:
                if walk is not None:
                    walk.finish()
                walk = _StreamWalk(event.stream_id, native, report, models, found)
                report.streams += 1
            walk.apply(event, state, row)
            models.count_event(event)
            report.events += 1
        if on_progress is not None:
            on_progress(len(batch))
    if walk is not None:
        walk.finish()
    await models.compare_waiting()


@dataclass(frozen=True)
class _ShareWalked:
    """What a process that walked a share hands back (pickled)."""

    report: VerifyReport
    figures: ShareFigures


def _walk_share(*args: Any) -> _ShareWalked:
    """The entry point of a walker process: ``_walk_share_in`` on an event loop of its own."""
    return asyncio.run(_walk_share_in(*args))


async def _walk_share_in(
    database_url: str,
    snapshot: str,
    share: _Share,
    native: str,
    checkpoints: dict[str, Checkpoint],
    batch_events_max: int,
    cards_per_check_max: int,
    scope: str,
) -> _ShareWalked:
    report = VerifyReport()
    # The same limits as the pool the first share is walked through (ledger.postgres.database.create_pool).
    connection = await asyncpg.connect(database_url, **connect_options())
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            await connection.execute(f"set transaction snapshot '{snapshot}'; {_SESSION}")
            await connection.execute("select set_config('giftcard.tenant', $1, true)", scope)
            models = ReadModelCheck(
                connection, native, checkpoints, report.add, cards_per_check_max=cards_per_check_max
            )
            await _walk(connection, share, native, report, models, report.add, batch_events_max, None)
    finally:
        await connection.close()
    return _ShareWalked(report, models.share_figures())


def _add_share(
    report: VerifyReport,
    models: ReadModelCheck,
    share: _ShareWalked,
    found: Callable[[Failure], None],
    on_progress: Callable[[int], None] | None,
) -> None:
    walked = share.report
    report.events += walked.events
    report.streams += walked.streams
    report.cards += walked.cards
    report.totals.add_totals(walked.totals)
    for failure in walked.failures:
        found(failure)
    report.failures_total += walked.failures_total - len(walked.failures)  # counted, not kept by the share
    models.add_share(share.figures)
    if on_progress is not None:
        on_progress(walked.events)


def render_report(report: VerifyReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "events": report.events,
        "streams": report.streams,
        "cards": report.cards,
        "failuresTotal": report.failures_total,
        "failures": [render_failure(f) for f in report.failures],
        "failuresTruncated": report.failures_total > len(report.failures),
        "totals": report.totals.render(),
        "readModels": [
            {
                "name": result.name,
                "checkpoint": result.checkpoint.render(),
                "compared": result.compared,
                "lagEvents": result.lag_events,
            }
            for result in report.read_models
        ],
    }
