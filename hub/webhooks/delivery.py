"""The deliverer: follows the commit order per subscription and POSTs each event, signed.

Per subscription, one batch at a time: take the subscription's advisory lock (a deliverer in
another process that holds it is skipped, so one process sends a subscription's events at a
time; each of a process's slots hands its lock from one subscription to the next, see
storage.SlotLock), read the events after its checkpoint in the gap-safe commit order, and POST
those it wants, one after another. The checkpoint moves once per batch, past every event a receiver
took (an UPDATE and a commit per event cost the database more than the POST itself); a failure
moves it up to the failing event and blocks the subscription there (so every card's events
arrive in ledger order), to be retried after an exponential backoff; after ``attempts_max``
failures the event is moved to the dead letters and delivery goes on with the next one.

At least once: a deliverer that dies after a receiver's 2xx and before its batch's checkpoint
update sends those events again (a stopping deliverer saves what it delivered first).
Receivers dedupe by ``webhook-id`` (the event's id, signed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

import asyncpg

from hub.config import Settings
from hub.providers.egress import EgressPolicy
from hub.webhooks import events as public_events
from hub.webhooks import storage
from hub.webhooks.client import WebhookClient
from hub.webhooks.signing import EVENT_TYPE_HEADER, Signer, is_standard
from hub.webhooks.subscriptions import open_secrets
from ledger.domain.topics import stored_types
from ledger.eventstore.commit_order import START, Checkpoint
from ledger.eventstore.store import EventStore, RecordedEvent
from ledger.postgres.credentials_cipher import CredentialsCipher
from ledger.postgres.database import DATABASE_ERRORS, create_pool
from ledger.postgres.tenancy import ALL_TENANTS, tenant_scope

log = logging.getLogger(__name__)

USER_AGENT = "giftcard-webhooks/1"
POOL_SIZE_MAX = 6  # up to 4 subscriptions delivering at once, each holding one
STOP_SAVE_S = 1.0  # a cancelled batch's last try at storing its progress


@dataclass(frozen=True)
class DeliveryOptions:
    """Limits of the deliverer, with units; tests shrink the waits to keep the suite fast."""

    attempts_max: int = 10  # failures of one event in a row before it becomes a dead letter
    backoff_base_s: float = 1.0  # wait after the first failure; doubled after each further one
    backoff_max_s: float = 300.0  # and never longer than this
    timeout_s: float = 10.0  # one POST, connection included
    batch_events_max: int = 100  # events read per batch (filtered-out ones included)
    batches_per_turn_max: int = 10  # then the subscription yields its slot to the others
    poll_interval_s: float = 0.5  # how often due subscriptions are looked for
    # Turns the polls start, a second at most: a turn costs the database four statements however few
    # events it carries, so with more stores due at each poll than this allows, the polls come less
    # often (100 busy stores: a poll a second, their batches twice as large; docs/benchmarks.md).
    polled_turns_per_s_max: float = 100.0
    subscriptions_concurrent_max: int = 4  # each one delivering holds a database connection
    failure_pause_s: float = 5.0  # after an unexpected error (database down) before trying again
    cards_cached_max: int = 10_000  # card currencies remembered
    error_chars_max: int = 300  # of a failure's description, as stored and shown

    def __post_init__(self) -> None:
        counts = (self.attempts_max, self.batch_events_max, self.batches_per_turn_max)
        if min(counts) < 1 or self.subscriptions_concurrent_max < 1:
            raise ValueError("attempts, batch sizes and concurrency must be at least 1")
        if min(self.backoff_base_s, self.backoff_max_s, self.timeout_s, self.poll_interval_s) <= 0:
            raise ValueError("backoff, timeout and poll interval must be positive seconds")
        if self.polled_turns_per_s_max <= 0:
            raise ValueError("polled_turns_per_s_max must be positive")
        if self.cards_cached_max < self.batch_events_max:  # a batch's cards must all stay remembered
            raise ValueError("cards_cached_max must be at least batch_events_max")

    def backoff_s(self, attempts: int) -> float:
        """Wait after the ``attempts``-th failure in a row: base, 2 × base, 4 × base, ... up to the max.

        No jitter: one deliverer at a time retries a subscription, so there is no herd to spread.
        """
        return min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(attempts - 1, 64))

    def poll_wait_s(self, due: int) -> float:
        """Wait after a poll that found ``due`` subscriptions due, before the next poll."""
        return max(self.poll_interval_s, due / self.polled_turns_per_s_max)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> DeliveryOptions:
        """The limits an operator sets (``GIFTCARD_WEBHOOK_*``); the rest keep their defaults."""
        values: dict[str, object] = {
            "attempts_max": settings.webhook_attempts_max,
            "backoff_base_s": settings.webhook_backoff_base_s,
            "backoff_max_s": settings.webhook_backoff_max_s,
            "timeout_s": settings.webhook_timeout_s,
        }
        return cls(**{**values, **overrides})


class Progress(NamedTuple):
    handled: int  # events the checkpoint moved past (delivered, filtered out or dead-lettered)
    more: bool  # a full batch went through: more events may be waiting


IDLE = Progress(0, False)


async def run_deliveries(
    pool: asyncpg.Pool,
    settings: Settings,
    stop: asyncio.Event,
    *,
    cipher: CredentialsCipher | None = None,
    options: DeliveryOptions | None = None,
) -> None:
    """Delivers every subscription's events until ``stop`` is set (or the task is cancelled).

    Any number of deliverers may run side by side (every ``giftcard serve`` process and
    ``giftcard webhooks run``): each subscription is delivered by one of them at a time.
    """
    options = options or DeliveryOptions.from_settings(settings)
    policy = EgressPolicy(settings.provider_allowlist)
    async with delivery_client(policy) as client:
        deliverer = Deliverer(pool, client, cipher or CredentialsCipher(settings.secret_key), options)
        await deliverer.run(stop)


async def create_delivery_pool(database_url: str) -> asyncpg.Pool:
    """The deliverers' pool. Its connections skip asyncpg's full release reset although a slot
    holds a session-level lock: ``storage.SlotLock`` closes a connection whose lock it cannot be
    sure it released, so none goes back to the pool holding one."""
    return await create_pool(database_url, size_min=1, size_max=POOL_SIZE_MAX, session_state=False)


@contextlib.asynccontextmanager
async def delivery_client(policy: EgressPolicy) -> AsyncIterator[WebhookClient]:
    """An HTTP client that connects only where the egress policy allows, checked at every connection."""
    client = WebhookClient(policy, USER_AGENT)
    try:
        yield client
    finally:
        await client.close()


class CardCurrencies:
    """Each card's currency (on its issue event only), which its later events' amounts need."""

    def __init__(self, cards_max: int) -> None:
        self.cards_max = cards_max
        self._known: OrderedDict[str, str] = OrderedDict()

    def of(self, card_id: str) -> str | None:
        return self._known.get(card_id)

    async def learn(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        for event in events:
            currency = public_events.currency_of_issue(event)
            if currency is not None:
                self._remember(event.stream_id, currency)
        # Looked up card by card: a set minus the keys would walk every card known, at every batch.
        known = self._known
        missing = sorted(
            {e.stream_id for e in events if e.stream_id not in known and public_events.needs_card_currency(e)}
        )
        if missing:
            found = await storage.card_currencies(connection, missing, stored_types(public_events.ISSUED))
            for card_id, currency in found.items():
                self._remember(card_id, currency)

    def _remember(self, card_id: str, currency: str) -> None:
        self._known[card_id] = currency
        self._known.move_to_end(card_id)
        while len(self._known) > self.cards_max:
            self._known.popitem(last=False)


@dataclass
class _Batch:
    committed: Checkpoint  # the checkpoint as stored
    events: Sequence[RecordedEvent]  # read after ``committed``
    handled: int = 0  # how many of ``events``, from the first, were delivered or filtered out
    delivered: int = 0  # events a receiver took since ``committed``
    head: Checkpoint = START  # where every event of the store up to it is handled too (a short batch's)

    @property
    def done(self) -> Checkpoint:
        """Past the last event handled, not yet stored: worked out when asked for (a failure, a stop,
        the batch's end), not at every event."""
        return self.committed.past(self.events[: self.handled]).joined(self.head)


class Deliverer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        client: WebhookClient,
        cipher: CredentialsCipher,
        options: DeliveryOptions,
    ) -> None:
        self.pool = pool
        self.store = EventStore(pool)
        self.client = client
        self.cipher = cipher
        self.options = options
        self.currencies = CardCurrencies(options.cards_cached_max)
        self._slots: set[asyncio.Task[int]] = set()  # each one delivering subscriptions, one after another
        self._running: set[str] = set()  # the subscriptions in a slot's turn now
        self._paused_until: dict[str, float] = {}
        # Due subscriptions waiting for a slot, the one whose last turn began longest ago first, so
        # that subscriptions always due (a busy store's) never starve the others (see _start_due).
        self._waiting: deque[str] = deque()
        self._turn_began: dict[str, float] = {}
        self._stopping = False
        self._told_to_rotate: set[str] = set()
        # Each due subscription's store (a subscription never changes store), so that a batch need not
        # look it up, and whether dead letters wait for a retry, so that a batch asks only then.
        self._listed: dict[str, storage.Due] = {}
        # Every store's head as the last poll read it: a turn started after the poll takes it along
        # (see _deliver_locked); a turn already running keeps the one read before it began.
        self._head_seen = START

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Starts a task per due subscription (up to the concurrency limit) every poll, until ``stop``."""
        try:
            while not stop.is_set():
                try:
                    wait_s = self.options.poll_wait_s(await self._start_due())
                except DATABASE_ERRORS as e:
                    log.warning("webhook deliverer cannot list subscriptions (%r); trying again", e)
                    wait_s = self.options.failure_pause_s
                except Exception:  # a bug: say so, and keep the other subscriptions' deliveries going
                    log.exception("webhook deliverer failed to start deliveries; trying again")
                    wait_s = self.options.failure_pause_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait_s)
        finally:
            self._stopping = True
            tasks = list(self._slots)
            for task in tasks:
                task.cancel()  # an interrupted POST is sent again later: at least once
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run_once(self) -> int:
        """Delivers until nothing is due, without waiting out backoffs; returns the events handled."""
        total = 0
        while True:
            self._waiting = deque(await self._due())
            handled = await self._work_slot(waits_out_pauses=False)
            if handled == 0:
                return total
            total += handled

    async def _due(self) -> list[str]:
        self._listed, self._head_seen = await storage.due_subscriptions(self.pool)
        return list(self._listed)

    async def _start_due(self) -> int:
        """Queues the due subscriptions, fairly: each slot that frees takes the one whose last turn
        began longest ago (never, first), so a few always-due subscriptions cannot hold every slot.
        Returns how many were due."""
        due = await self._due()
        now = time.monotonic()
        self._paused_until = {key: until for key, until in self._paused_until.items() if until > now}
        self._waiting = deque(sorted(due, key=lambda key: self._turn_began.get(key, 0.0)))
        known = {*due, *self._running}  # forget the rest: removed, or caught up
        self._turn_began = {key: began for key, began in self._turn_began.items() if key in known}
        self._fill_slots()
        return len(due)

    def _fill_slots(self) -> None:
        while self._waiting and len(self._slots) < self.options.subscriptions_concurrent_max:
            slot = asyncio.create_task(self._work_slot())
            self._slots.add(slot)
            slot.add_done_callback(self._slot_ended)

    def _slot_ended(self, slot: asyncio.Task[int]) -> None:
        self._slots.discard(slot)
        if not self._stopping:
            self._fill_slots()  # subscriptions queued by a poll while this slot was finishing

    def _next_waiting(self, waits_out_pauses: bool) -> str | None:
        now = time.monotonic()
        while self._waiting:
            subscription_id = self._waiting.popleft()
            paused = waits_out_pauses and self._paused_until.get(subscription_id, 0.0) > now
            if subscription_id not in self._running and not paused:
                self._turn_began[subscription_id] = now
                return subscription_id
        return None

    async def _work_slot(self, *, waits_out_pauses: bool = True) -> int:
        """One slot: a turn of each waiting subscription, one after another, on one connection (and
        one lock, handed on); returns the events handled. Never raises (but for cancellation).

        A subscription still behind after its turn queues again, behind the others waiting: were it
        left for the next poll, one subscription could never get more than a turn's events a poll
        interval (1,000 every 0.5 s), however busy its store and idle the deliverer."""
        handled = 0
        try:
            async with self._slot_lock() as lock:
                while lock.usable and not self._stopping:
                    subscription_id = self._next_waiting(waits_out_pauses)
                    if subscription_id is None:
                        break
                    self._running.add(subscription_id)
                    try:
                        progress = await self._take_turn(lock, subscription_id, self._head_seen)
                    finally:
                        self._running.discard(subscription_id)
                    handled += progress.handled
                    if progress.more:
                        self._waiting.append(subscription_id)
        except DATABASE_ERRORS as e:
            self._waiting.clear()  # the next poll queues them again (no slot retries at once, in a loop)
            log.warning("webhook deliverer cannot reach the database (%r); trying again", e)
        return handled

    async def _take_turn(self, lock: storage.SlotLock, subscription_id: str, head: Checkpoint) -> Progress:
        """A few batches of one subscription; ``more`` when its last one was full (it is behind).
        Never raises (but for cancellation): errors pause it, and a slot whose connection broke ends
        (``lock.usable``)."""
        handled = 0
        try:
            for _ in range(self.options.batches_per_turn_max):
                progress = await self._deliver_batch_on(lock, subscription_id, head)
                handled += progress.handled
                if not progress.more:
                    break
            return Progress(handled, progress.more)
        except asyncio.CancelledError:
            raise
        except storage.SubscriptionMoved as e:
            log.info("webhook batch stopped: %s", e)
        except Exception:
            # A database outage, a missing GIFTCARD_SECRET_KEY, an event that cannot be rendered
            # (a bug): say so loudly and try again later; the checkpoint stays before the event.
            self._paused_until[subscription_id] = time.monotonic() + self.options.failure_pause_s
            log.exception(
                "webhook subscription %s failed; retrying in %.1f s", subscription_id, self.options.failure_pause_s
            )
        return Progress(handled, more=False)

    # ---- one batch -----------------------------------------------------------------------------

    async def deliver_batch(self, subscription_id: str, head: Checkpoint = START) -> Progress:
        """One batch, on a connection and under a lock of its own; IDLE when another deliverer holds it.

        ``head`` is every store's head, read before this call: a short batch's checkpoint may stand there."""
        async with self._slot_lock() as lock:
            return await self._deliver_batch_on(lock, subscription_id, head)

    @contextlib.asynccontextmanager
    async def _slot_lock(self) -> AsyncIterator[storage.SlotLock]:
        """A connection of the pool and its subscription lock, released (or the connection closed) after."""
        with tenant_scope(ALL_TENANTS):  # until the first hand-over enters a store
            async with self.pool.acquire() as connection:
                lock = storage.SlotLock(connection)
                try:
                    yield lock
                finally:
                    await lock.release()

    async def _deliver_batch_on(self, lock: storage.SlotLock, subscription_id: str, head: Checkpoint) -> Progress:
        """One batch, under the subscription's lock (taken from the slot's, unless held already).

        It runs in the subscription's tenant: the events it reads are that store's alone."""
        listed = self._listed.get(subscription_id)
        if listed is None:  # not listed by the last poll: look its store up, and ask for retries
            with tenant_scope(ALL_TENANTS):
                tenant = await storage.tenant_of(self.pool, subscription_id)
            if tenant is None:  # deleted
                return IDLE
            listed = storage.Due(tenant, retry=True)
        if lock.held != subscription_id and not await lock.take(subscription_id, listed.tenant_id):
            return IDLE
        with tenant_scope(listed.tenant_id):
            return await self._deliver_locked(lock.connection, subscription_id, head, listed.retry)

    async def _deliver_locked(
        self, connection: asyncpg.Connection, subscription_id: str, head: Checkpoint, retry: bool
    ) -> Progress:
        # Loaded after the lock is held, so a deliverer that just finished a batch is never repeated.
        subscription = await storage.load_due(connection, subscription_id)
        if subscription is None:
            return IDLE
        signing_secrets = open_secrets(self.cipher, subscription.id, subscription.sealed_secret)
        self._ask_for_rotation(subscription.id, signing_secrets)
        signer = Signer(signing_secrets)
        if retry:
            await self._redeliver_dead_letters(connection, subscription, signer)
        events = await self.store.read_all(
            subscription.checkpoint, self.options.batch_events_max, connection=connection
        )
        await self.currencies.learn(connection, events)
        batch = _Batch(subscription.checkpoint, events)
        more = len(events) == self.options.batch_events_max
        try:
            for event in events:
                public_type = public_events.public_type(event.type)
                if public_type is not None and subscription.wants(public_type):
                    body = public_events.render(event, self.currencies.of(event.stream_id))
                    error = await self._post(subscription, signer, event.position, public_type, body)
                    if error is not None:
                        await self._failed(connection, subscription, batch, event, public_type, body, error)
                        return Progress(batch.handled, more=False)
                    batch.delivered += 1
                batch.handled += 1
            if not more:
                # A short batch holds every event of this store up to the head read before it, so the
                # checkpoint may stand there: a quiet store's subscription is not due again at every poll
                # for other stores' events (its reads see only its own; see migration 0021). Only that
                # head: a poll made while this batch was POSTing read events the batch never saw.
                batch.head = head
            done = batch.done
            if done != batch.committed:
                await storage.advance(connection, subscription.id, batch.committed, done, batch.delivered)
        except asyncio.CancelledError:  # between two POSTs, or while the checkpoint was being stored
            await _save_on_stop(connection, subscription.id, batch)
            raise
        return Progress(len(events), more=more)

    async def _failed(
        self,
        connection: asyncpg.Connection,
        subscription: storage.Subscription,
        batch: _Batch,
        event: RecordedEvent,
        public_type: str,
        body: bytes,
        error: str,
    ) -> None:
        # The stored count belongs to the event just after the stored checkpoint: this one, unless
        # the batch got past other events first.
        done = batch.done
        earlier = subscription.attempts if done == subscription.checkpoint else 0
        attempts = earlier + 1
        if attempts >= self.options.attempts_max:
            await storage.dead_letter(
                connection,
                subscription.id,
                batch.committed,
                done,
                batch.delivered,
                event,
                public_type,
                body,
                attempts,
                error,
            )
            log.warning(
                "webhook %s: event %d dead-lettered after %d attempts (%s)",
                subscription.id,
                event.position,
                attempts,
                error,
            )
            return
        retry_in_s = self.options.backoff_s(attempts)
        await storage.record_failure(
            connection, subscription.id, batch.committed, done, batch.delivered, attempts, retry_in_s, error
        )
        log.info(
            "webhook %s: event %d failed (attempt %d of %d: %s); retrying in %.2f s",
            subscription.id,
            event.position,
            attempts,
            self.options.attempts_max,
            error,
            retry_in_s,
        )

    async def _redeliver_dead_letters(
        self, connection: asyncpg.Connection, subscription: storage.Subscription, signer: Signer
    ) -> None:
        """One more attempt at each dead letter an operator asked to retry (out of ledger order, by nature)."""
        for letter in await storage.retries_due(connection, subscription.id, self.options.batch_events_max):
            error = await self._post(subscription, signer, letter.position, letter.event_type, letter.body)
            if error is None:
                await storage.redelivered(connection, letter)
                log.info("webhook %s: dead letter %d redelivered", subscription.id, letter.position)
            else:
                await storage.redelivery_failed(connection, letter, error)
                log.warning("webhook %s: dead letter %d failed again (%s)", subscription.id, letter.position, error)

    def _ask_for_rotation(self, subscription_id: str, signing_secrets: Sequence[str]) -> None:
        """Once per process, a warning for a subscription whose secret cannot sign Standard Webhooks."""
        if is_standard(signing_secrets[0]) or subscription_id in self._told_to_rotate:
            return
        self._told_to_rotate.add(subscription_id)
        log.warning(
            "webhook %s: its secret predates Standard Webhooks (not base64), so deliveries carry only the "
            "deprecated X-Giftcard-Signature; give its receiver a new one: giftcard webhooks rotate-secret %s",
            subscription_id,
            subscription_id,
        )

    # ---- HTTP ----------------------------------------------------------------------------------

    async def _post(
        self,
        subscription: storage.Subscription,
        signer: Signer,
        event_id: int,
        public_type: str,
        body: bytes,
    ) -> str | None:
        """POSTs one signed body; None when the receiver answered 2xx, else what went wrong."""
        headers = {
            "Content-Type": "application/json",
            EVENT_TYPE_HEADER: public_type,
            # Signed afresh at every attempt: receivers refuse old timestamps.
            **signer.headers(event_id, int(time.time()), body),
        }
        try:
            status = await self.client.post(subscription.url, headers, body, self.options.timeout_s)
        except TimeoutError:
            return f"no answer from {_host(subscription.url)} within {self.options.timeout_s:g} s"
        except (OSError, ValueError) as e:
            described = f"{type(e).__name__}: {e}".replace(subscription.url, _host(subscription.url))
            return described[: self.options.error_chars_max]
        if 200 <= status < 300:
            return None
        return f"HTTP {status} from {_host(subscription.url)}"


async def _save_on_stop(connection: asyncpg.Connection, subscription_id: str, batch: _Batch) -> None:
    """Stores how far a cancelled batch got, so a deliverer stopped between two POSTs sends nothing twice.

    Best effort, briefly: a connection cancelled mid-query cannot take it, and then the events after
    the stored checkpoint are sent again (at least once)."""
    done = batch.done
    if done == batch.committed:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(STOP_SAVE_S):
            await asyncio.shield(storage.advance(connection, subscription_id, batch.committed, done, batch.delivered))


def _host(url: str) -> str:
    """What a log line or an error may name of a URL: never its path or query (they may hold tokens)."""
    return urlsplit(url).netloc
