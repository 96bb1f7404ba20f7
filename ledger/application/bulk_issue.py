"""Bulk issuance: a batch of N cards, each with its own events, codes shown once, resumable.

**Identity.** A batch has an id (given, or generated and shown first). Card ``n`` of the batch
(``0 <= n < N``) has the relationName ``{batch_id}-{n:06d}``, so ``card_lookup``'s unique
``relation_name`` makes issuing card ``n`` twice impossible whoever tries, and which cards
already exist is one indexed query. A run (or a retry) issues only the missing ``n``.

**Same events as one by one.** Each card is issued as ``Ledger.issue`` issues one:
``GiftCard.issue``, then ``GiftCard.credit`` (requestId ``issue:{batch_id}:{n}``) when the value
is not zero, through the same mapper, hash chain and idempotency key, in the same two appends
(Issued at version 0, Credited after it). Only the round trips are shared: a chunk of cards is
one transaction of three statements (the ``card_lookup`` rows, every Issued event, every
Credited event) instead of three per card.

**Codes, durably (the command line).** A code exists in clear only in memory until it is
written; the database keeps its HMAC. So the order of the steps decides what a crash can lose.
For each chunk:

1. prepare the cards, codes and events (nothing written);
2. append the chunk's rows (n, card id, code) to ``OUTPUT.partial``, flush and fsync;
3. commit the chunk.

A crash before step 3 commits leaves rows whose cards do not exist; after it, nothing is left
unwritten: no card ever exists whose code was not on disk first. Every run starts by
reconciling the file with the database: a row is kept only if its card exists *with that id*
(card ``n`` of a chunk that never committed is issued again later, with a new id and code, and
its stale row dropped). When every card exists, ``OUTPUT.partial`` becomes ``OUTPUT``. A card
of the batch can lack its code only if the file was lost or another ``--output`` named: those
are reported as "issued, code lost" with their ids, never silently issued again.

**Codes over HTTP.** The answer is the only copy, so a request is all or nothing: its chunks
share one transaction, and nothing is committed unless everything is. A retry with the same
batch id issues only what is missing and says how many cards already existed (their codes
were in the answer that issued them and cannot be shown again).

**One writer per batch.** A run holds a PostgreSQL advisory lock keyed by the batch id (the
command line for its session, a request for its transaction); a second attempt is refused at
once (409) instead of racing for the same card numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from eventsourcing.persistence import Mapper

from ledger.application import codes_file
from ledger.application.codes_file import CodeRow, CodesFileRefused
from ledger.application.commands import Ledger
from ledger.domain import errors
from ledger.domain.codes import hash_code, new_redemption_code, visible_tail
from ledger.domain.giftcard import CREDIT, GiftCard, transaction_key
from ledger.domain.money import exponent_of, to_major, to_minor
from ledger.eventstore.codec import new_mapper
from ledger.eventstore.store import NewEvent, StreamAppend
from ledger.postgres.distribution import violates
from ledger.postgres.personal_data import PROFILE

CHUNK_CARDS_DEFAULT = 1_000  # cards per transaction: large enough to amortize a commit, small enough to redo
CHUNK_CARDS_MAX = 5_000
NUMBER_DIGITS = 6
BATCH_CARDS_MAX = 10**NUMBER_DIGITS  # card numbers have six digits
BATCH_ID_CHARS_MAX = 64
EXISTING_NAMES_PER_QUERY = 10_000  # relation names looked up per query when finding a batch's cards
CAPTION_DEFAULT = "Gift card"
CREDIT_DESCRIPTION = "bulk issuance"

_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LOCK_NAMESPACE = b"giftcard-bulk-issue:"

_INSERT_LOOKUP_ROWS = """
insert into card_lookup (card_id, code_hash, relation_name, profile_id)
select * from unnest($1::text[], $2::bytea[], $3::text[], $4::text[])
"""

_EXISTING_CARDS = "select relation_name, card_id from card_lookup where relation_name = any($1::text[])"


class BatchBusy(errors.Conflict):
    code = "batch_busy"


class BatchTermsMismatch(errors.Conflict):
    code = "batch_terms_mismatch"


# ---- what a batch is -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BatchRequest:
    """What the caller asked for. Terms left out come from the batch's existing cards (a resumed
    batch stays uniform), else from the defaults."""

    batch_id: str
    count: int
    value: Decimal
    currency: str | None = None
    expiring_date: datetime | None = None
    caption: str | None = None
    profile_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class BatchDefaults:
    currency: str
    expiring_date: datetime
    caption: str = CAPTION_DEFAULT


@dataclass(frozen=True, kw_only=True)
class BatchTerms:
    """What every card of the batch is issued with."""

    batch_id: str
    count: int
    value: int  # minor units of currency; 0 issues cards with no Credit
    currency: str
    expiring_date: datetime
    caption: str
    profile_id: str


@dataclass(frozen=True)
class PreparedCard:
    """One card decided and encoded, not yet written: its code exists only here."""

    n: int
    card_id: str
    relation_name: str
    profile_id: str
    redemption_code: str
    code_hash: bytes
    issued: list[NewEvent]  # version 1
    credited: list[NewEvent]  # after it; none when the value is zero
    credit_idempotency_key: str


@dataclass
class BatchOutcome:
    terms: BatchTerms
    already_issued: int  # cards of the batch that existed before this run
    issued_now: int = 0
    cards: list[PreparedCard] = field(default_factory=list)  # this request's, in card order (HTTP only: a
    # file run keeps none in memory, its codes are in the file)
    lost: list[tuple[int, str]] = field(default_factory=list)  # (n, card id): issued before, code not in the output


# ---- pure helpers ----------------------------------------------------------------------------


def check_batch_id(batch_id: str) -> str:
    if len(batch_id) > BATCH_ID_CHARS_MAX or not _BATCH_ID.fullmatch(batch_id):
        raise errors.InvalidRequest(
            f"batchId must be 1 to {BATCH_ID_CHARS_MAX} letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit), got {batch_id!r}"
        )
    return batch_id


def check_count(count: int, count_max: int) -> int:
    if not 1 <= count <= count_max:
        raise errors.InvalidRequest(f"count must be between 1 and {count_max} cards, got {count}")
    return count


def new_batch_id(now: datetime) -> str:
    return f"batch-{now.astimezone(UTC):%Y%m%d}-{uuid.uuid4().hex[:8]}"


def relation_name(batch_id: str, n: int) -> str:
    return f"{batch_id}-{n:0{NUMBER_DIGITS}d}"


def credit_request_id(batch_id: str, n: int) -> str:
    return f"issue:{batch_id}:{n}"


def minor_value(value: Decimal, currency: str) -> int:
    """The value every card is loaded with; zero is allowed here (cards issued empty)."""
    if value.is_finite() and value == 0:
        exponent_of(currency)  # still refuses an unknown currency
        return 0
    return to_minor(value, currency)


def missing_numbers(count: int, existing: Iterable[int]) -> list[int]:
    present = set(existing)
    return [n for n in range(count) if n not in present]


def chunked(numbers: Sequence[int], size: int) -> list[Sequence[int]]:
    return [numbers[i : i + size] for i in range(0, len(numbers), size)]


def lock_key(batch_id: str) -> int:
    """A stable 64-bit advisory lock key for the batch (hashtext is not promised stable across versions)."""
    return int.from_bytes(hashlib.sha256(_LOCK_NAMESPACE + batch_id.encode()).digest()[:8], "big", signed=True)


def resolve_terms(request: BatchRequest, defaults: BatchDefaults, existing: BatchTerms | None) -> BatchTerms:
    """The batch's terms: the request's, completed from the existing cards (else the defaults);
    a resumed batch must not change what its first cards were issued with."""
    currency = request.currency or (existing.currency if existing else defaults.currency)
    terms = BatchTerms(
        batch_id=check_batch_id(request.batch_id),
        count=check_count(request.count, BATCH_CARDS_MAX),
        value=minor_value(request.value, currency),
        currency=currency,
        expiring_date=request.expiring_date or (existing.expiring_date if existing else defaults.expiring_date),
        caption=request.caption or (existing.caption if existing else defaults.caption),
        profile_id=request.profile_id or (existing.profile_id if existing else request.batch_id),
    )
    if existing is not None:
        check_same_terms(terms, existing)
    return terms


def check_same_terms(terms: BatchTerms, existing: BatchTerms) -> None:
    names = ("value", "currency", "expiring_date", "caption", "profile_id")
    differing = [name for name in names if getattr(terms, name) != getattr(existing, name)]
    if differing:
        described = ", ".join(f"{name} {_shown(existing, name)}" for name in differing)
        raise BatchTermsMismatch(
            f"batch {terms.batch_id!r} was started with {described}: resume it with the same terms "
            "(or leave them out), or start another batch"
        )


def _shown(terms: BatchTerms, name: str) -> str:
    value = getattr(terms, name)
    if name == "value":
        return f"{to_major(value, terms.currency)} {terms.currency}"
    return value.isoformat() if isinstance(value, datetime) else repr(value)


def terms_of_card(card: GiftCard, batch_id: str, n: int, count: int) -> BatchTerms:
    """The terms an existing card of the batch was issued with."""
    credit = next(
        (
            t
            for t in card.transactions.values()
            if t.operation == CREDIT and t.request_id == credit_request_id(batch_id, n)
        ),
        None,
    )
    return BatchTerms(
        batch_id=batch_id,
        count=count,
        value=0 if credit is None else credit.value,
        currency=card.currency,
        expiring_date=card.expiring_date,
        caption=card.caption,
        profile_id=card.profile_id,
    )


def prepare_card(terms: BatchTerms, n: int, now: datetime, code_key: bytes, mapper: Mapper) -> PreparedCard:
    """Card ``n`` decided by the aggregate exactly as ``Ledger.issue`` and a first Credit decide it."""
    code = new_redemption_code()
    card = GiftCard.issue(
        relation_name=relation_name(terms.batch_id, n),
        caption=terms.caption,
        profile_id=terms.profile_id,
        currency=terms.currency,
        emission_date=now,
        expiring_date=terms.expiring_date,
        restricted_to_owner=False,
        multiple_credits=True,
        multiple_redemptions=True,
        code_tail=visible_tail(code),
        issued_at=now,
    )
    issued = card.collect_events()
    request_id = credit_request_id(terms.batch_id, n)
    if terms.value:
        card.credit(
            transaction_id=uuid.uuid4().hex,
            value=terms.value,
            description=CREDIT_DESCRIPTION,
            request_id=request_id,
            order_info=None,
            now=now,
        )
    return PreparedCard(
        n=n,
        card_id=str(card.id),
        relation_name=card.relation_name,
        profile_id=card.profile_id,
        redemption_code=code,
        code_hash=hash_code(code, code_key),
        issued=_new_events(mapper, issued),
        credited=_new_events(mapper, card.collect_events()),
        credit_idempotency_key=transaction_key(request_id),
    )


def prepare_chunk(
    terms: BatchTerms, numbers: Sequence[int], now: datetime, code_key: bytes, mapper: Mapper
) -> list[PreparedCard]:
    return [prepare_card(terms, n, now, code_key, mapper) for n in numbers]


def _new_events(mapper: Mapper, pending: list[Any]) -> list[NewEvent]:
    return [NewEvent(s.topic, s.state) for s in map(mapper.to_stored_event, pending)]


def code_row(card: PreparedCard, terms: BatchTerms) -> CodeRow:
    return CodeRow(
        n=card.n,
        card_id=card.card_id,
        relation_name=card.relation_name,
        redemption_code=card.redemption_code,
        value=str(to_major(terms.value, terms.currency)),
        currency=terms.currency,
        expiring_date=terms.expiring_date.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    )


def reconcile(rows: Sequence[CodeRow], terms: BatchTerms, existing: dict[int, str]) -> list[CodeRow]:
    """The rows whose card exists with that very id: a row of a chunk that never committed (its
    card number is free, or was issued again with another id) is dropped. Rows this run cannot
    judge (another batch's, or beyond its count) make it refuse the file rather than drop them."""
    foreign = next((row for row in rows if row.relation_name != relation_name(terms.batch_id, row.n)), None)
    if foreign is not None:
        raise CodesFileRefused(
            f"the output holds codes of another batch (card {foreign.relation_name!r}): name another --output"
        )
    beyond = max((row.n for row in rows), default=-1)
    if beyond >= terms.count:
        raise BatchTermsMismatch(
            f"the output holds card {beyond} of batch {terms.batch_id!r}: it was started with a count "
            f"above {beyond}, resume it with that count"
        )
    return [row for row in rows if existing.get(row.n) == row.card_id]


def in_card_order(written: Sequence[int], appended: Sequence[int]) -> bool:
    """Whether rows already in the file followed by rows appended now are sorted by card number."""
    ascending = all(a < b for a, b in zip(written, written[1:], strict=False))
    return ascending and (not written or not appended or written[-1] < appended[0])


def lost_cards(existing: dict[int, str], written: Iterable[int]) -> list[tuple[int, str]]:
    """Cards of the batch that exist but whose codes the output does not hold."""
    known = set(written)
    return sorted((n, card_id) for n, card_id in existing.items() if n not in known)


# ---- the command service ---------------------------------------------------------------------


class BulkIssuer:
    """Issues batches of cards into the ledger's event store."""

    def __init__(self, ledger: Ledger, *, chunk_cards: int = CHUNK_CARDS_DEFAULT) -> None:
        if not 1 <= chunk_cards <= CHUNK_CARDS_MAX:
            raise ValueError(f"chunk_cards must be between 1 and {CHUNK_CARDS_MAX}, got {chunk_cards}")
        self.ledger = ledger
        self.store = ledger.store
        self.chunk_cards = chunk_cards
        self._mapper = new_mapper(seal=ledger.personal.sealed)

    # ---- over HTTP: all or nothing, the answer is the only copy ----------------------------

    async def issue_in_one_transaction(
        self, request: BatchRequest, defaults: BatchDefaults, *, metadata: dict[str, Any]
    ) -> BatchOutcome:
        async with self.store.pool.acquire() as connection, connection.transaction():
            if not await connection.fetchval("select pg_try_advisory_xact_lock($1)", lock_key(request.batch_id)):
                raise _busy(request.batch_id)
            existing = await self.existing_cards(connection, request.batch_id, request.count)
            terms = await self._terms(request, defaults, existing)
            outcome = BatchOutcome(terms, already_issued=len(existing))
            async for cards in self._prepared_chunks(terms, missing_numbers(terms.count, existing)):
                await self._commit_chunk(connection, cards, metadata)
                outcome.cards.extend(cards)
            outcome.issued_now = len(outcome.cards)
            return outcome

    # ---- from the command line: chunk by chunk, codes on disk before each commit -------------

    async def issue_to_file(
        self,
        request: BatchRequest,
        defaults: BatchDefaults,
        output: Path,
        *,
        metadata: dict[str, Any],
        on_start: Callable[[BatchTerms, int], None] = lambda terms, missing: None,
        on_chunk: Callable[[int], None] = lambda cards: None,
        chunk_pause_s: float = 0.0,
    ) -> BatchOutcome:
        """Issues what is missing of the batch, writing every code to ``output`` before its card
        commits; ``on_start`` learns how many cards will be issued, ``on_chunk`` each commit."""
        with codes_file.exclusive(output):
            async with self._session_holding_batch(request.batch_id) as connection:
                existing = await self.existing_cards(connection, request.batch_id, request.count)
                terms = await self._terms(request, defaults, existing)
                kept = self._resume_file(output, terms, existing)
                outcome = BatchOutcome(terms, len(existing), lost=lost_cards(existing, (row.n for row in kept)))
                missing = missing_numbers(terms.count, existing)
                on_start(terms, len(missing))
                appender = codes_file.Appender(codes_file.partial_path(output))
                try:
                    async for cards in self._prepared_chunks(terms, missing):
                        await asyncio.to_thread(appender.append, [code_row(card, terms) for card in cards])
                        # The codes are on disk (fsynced): only now may their cards exist.
                        await self._commit_chunk(connection, cards, metadata)
                        outcome.issued_now += len(cards)
                        on_chunk(len(cards))
                        await asyncio.sleep(chunk_pause_s)
                finally:
                    appender.close()
            _finish_file(output, in_card_order([row.n for row in kept], missing))
        return outcome

    def _resume_file(self, output: Path, terms: BatchTerms, existing: dict[int, str]) -> list[CodeRow]:
        """The rows an earlier run left (in OUTPUT.partial, or OUTPUT if it finished), reconciled
        with the database and left in OUTPUT.partial for this run to append to."""
        partial = codes_file.partial_path(output)
        if partial.exists() and output.exists():
            raise CodesFileRefused(f"both {output} and {partial} exist: keep the one you trust, move the other away")
        source = partial if partial.exists() else output
        found = codes_file.read_rows(source) if source.exists() else codes_file.FileContent([], torn=False)
        kept = reconcile(found.rows, terms, existing)
        if source == output and output.exists():
            codes_file.rename_durably(output, partial)  # a finished batch being extended: resume its file
        if len(kept) != len(found.rows) or found.torn:
            codes_file.replace_atomically(partial, kept)  # before appending: no row may follow a torn one
        return kept

    # ---- steps shared by both ------------------------------------------------------------

    async def existing_cards(self, connection: asyncpg.Connection, batch_id: str, count: int) -> dict[int, str]:
        """Card number -> card id, for the batch's cards that exist (one indexed lookup per name)."""
        found: dict[int, str] = {}
        for start in range(0, count, EXISTING_NAMES_PER_QUERY):
            names = [relation_name(batch_id, n) for n in range(start, min(count, start + EXISTING_NAMES_PER_QUERY))]
            for row in await connection.fetch(_EXISTING_CARDS, names):
                found[int(row["relation_name"].rsplit("-", 1)[1])] = row["card_id"]
        return found

    async def _terms(self, request: BatchRequest, defaults: BatchDefaults, existing: dict[int, str]) -> BatchTerms:
        """The batch's terms, checked by the domain on a throwaway card 0 before anything is written."""
        check_batch_id(request.batch_id)
        issued_before = None
        if existing:
            first = min(existing)
            card = await self.ledger.card(existing[first])
            issued_before = terms_of_card(card, request.batch_id, first, request.count)
        terms = resolve_terms(request, defaults, issued_before)
        await self.ledger.personal.prepare([{PROFILE: terms.profile_id}])  # its cards' events are sealed in threads
        prepare_card(terms, 0, self.ledger.clock(), self.ledger.code_key, self._mapper)
        return terms

    async def _prepared_chunks(self, terms: BatchTerms, numbers: Sequence[int]) -> AsyncIterator[list[PreparedCard]]:
        """Chunks of prepared cards, the next one prepared in a thread while the caller writes
        this one: the encoding work of one chunk overlaps the database's work on the other."""
        chunks = chunked(numbers, self.chunk_cards)
        if not chunks:
            return
        code_key, mapper, clock = self.ledger.code_key, self._mapper, self.ledger.clock
        upcoming = asyncio.ensure_future(asyncio.to_thread(prepare_chunk, terms, chunks[0], clock(), code_key, mapper))
        try:
            for following in [*chunks[1:], None]:
                cards = await upcoming
                if following is not None:
                    upcoming = asyncio.ensure_future(
                        asyncio.to_thread(prepare_chunk, terms, following, clock(), code_key, mapper)
                    )
                yield cards
        finally:
            if not upcoming.done():
                await asyncio.gather(upcoming, return_exceptions=True)  # a thread cannot be cancelled: let it end

    async def _commit_chunk(
        self, connection: asyncpg.Connection, cards: list[PreparedCard], metadata: dict[str, Any]
    ) -> None:
        """One transaction (a savepoint inside the request's): lookup rows, Issued events, then the
        Credited events chained onto them, each with its requestId as idempotency key."""
        async with connection.transaction():
            await self._insert_lookup_rows(connection, cards)
            issued_hashes = await self.store.append_many(
                [StreamAppend(card.card_id, 0, card.issued) for card in cards], metadata=metadata, connection=connection
            )
            credits = [
                StreamAppend(card.card_id, len(card.issued), card.credited, last_hash, card.credit_idempotency_key)
                for card, last_hash in zip(cards, issued_hashes, strict=True)
                if card.credited
            ]
            if credits:
                await self.store.append_many(credits, metadata=metadata, connection=connection)

    async def _insert_lookup_rows(self, connection: asyncpg.Connection, cards: list[PreparedCard]) -> None:
        try:
            await connection.execute(
                _INSERT_LOOKUP_ROWS,
                [card.card_id for card in cards],
                [card.code_hash for card in cards],
                [card.relation_name for card in cards],
                [self.ledger.personal.subject_of(card.profile_id) for card in cards],
            )
        except asyncpg.UniqueViolationError as e:
            if violates(e, "card_lookup_relation_name_key"):
                raise errors.DuplicateRelationName(
                    f"a relationName of cards {cards[0].relation_name}..{cards[-1].relation_name} was taken "
                    "while the batch was being issued (by a card created one by one?)"
                ) from e
            raise

    @contextlib.asynccontextmanager
    async def _session_holding_batch(self, batch_id: str) -> AsyncIterator[asyncpg.Connection]:
        """A connection holding the batch's advisory lock for as long as the run lasts (released
        by the server if the process dies, since the lock belongs to the session)."""
        async with self.store.pool.acquire() as connection:
            if not await connection.fetchval("select pg_try_advisory_lock($1)", lock_key(batch_id)):
                raise _busy(batch_id)
            try:
                yield connection
            finally:
                await connection.execute("select pg_advisory_unlock($1)", lock_key(batch_id))


def _busy(batch_id: str) -> BatchBusy:
    return BatchBusy(f"batch {batch_id!r} is being issued by another run or request; retry when it has finished")


def _finish_file(output: Path, in_order: bool) -> None:
    """Every card exists: the partial file becomes the output, its rows in card order."""
    partial = codes_file.partial_path(output)
    if not in_order:  # a resumed run filled gaps below rows written earlier: rewrite once, sorted
        rows = codes_file.read_rows(partial).rows
        codes_file.replace_atomically(partial, sorted(rows, key=lambda row: row.n))
    codes_file.rename_durably(partial, output)
