"""Webhooks: ledger events POSTed, signed, to real receivers on loopback.

Receivers verify every signature (the Standard Webhooks headers with the ``standardwebhooks``
library receivers use, and the deprecated ``X-Giftcard-Signature``) and record what they accepted. They can fail on demand (500,
a connection reset, an answer slower than the deliverer's timeout), always fail one event type
(dead letters), or answer slowly (two deliverers side by side). Backoffs are shrunk to
milliseconds so the whole file runs in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from hub.cli.webhooks import add_commands
from hub.config import Settings
from hub.http import auth
from hub.http.openapi import describe, route_path
from hub.providers.egress import EgressPolicy
from hub.webhooks import run_deliveries, storage
from hub.webhooks.delivery import CardCurrencies, Deliverer, DeliveryOptions, delivery_client
from hub.webhooks.events import render
from hub.webhooks.signing import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SECRET_BYTES,
    SIGNATURE_HEADER,
    TOLERANCE_S,
    WEBHOOK_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
    SignatureInvalid,
    new_secret,
    sign,
    verify,
)
from hub.webhooks.subscriptions import (
    create_subscription,
    drop_previous_secret,
    rotate_secret,
    seal_secrets,
)
from ledger.application.commands import IssueCard, Ledger
from ledger.application.providers import Credentials, ProviderRegistry
from ledger.domain.errors import InvalidRequest
from ledger.domain.provider import ProviderSpec
from ledger.eventstore.commit_order import Checkpoint
from ledger.eventstore.store import EventStore, RecordedEvent
from ledger.postgres.credentials_cipher import CredentialsCipher, SecretKeyMissing
from ledger.postgres.database import create_pool
from ledger.postgres.tenancy import DEFAULT_TENANT
from tests.conftest import TEST_SECRET_KEY, Clock
from tests.providers.serving import serve

pytestmark = pytest.mark.also_on_citus

WAIT_S = 15.0
SLOW_S = 2.0  # a receiver's "slow" answer: far beyond the deliverer's timeout below
SETTINGS = Settings(provider_allowlist=("127.0.0.0/8",))  # receivers live on loopback
CIPHER = CredentialsCipher(TEST_SECRET_KEY)
FAST = DeliveryOptions(
    attempts_max=10,
    backoff_base_s=0.02,
    backoff_max_s=0.2,
    timeout_s=0.4,
    poll_interval_s=0.02,
    failure_pause_s=0.1,
)
CARD_TYPES = ["card.issued", "card.credited", "card.debited", "card.settled", "card.cancelled"]


# ---- a receiver ------------------------------------------------------------------------------


@dataclass
class Received:
    event_id: int
    payload: dict[str, Any]
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Verifies each delivery's signatures and records the ones it accepts (answered 2xx)."""

    url: str = ""
    secret: str | None = None
    standard: bool = True  # check the Standard Webhooks headers too (a secret from before them has none)
    accepted: list[Received] = field(default_factory=list)
    requests: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, event id) of every request
    verified: list[dict[str, str]] = field(default_factory=list)  # headers of every request whose signatures hold
    bad_signatures: int = 0
    faults: list[str] = field(default_factory=list)  # the next requests' faults, in order: 500, reset, slow
    refuse: Callable[[dict[str, Any]], bool] | None = None  # always answer 500 to these
    delay_s: float = 0.0  # accept, but only after this long
    on_request: Callable[[], Awaitable[None]] | None = None  # awaited as each request arrives
    in_flight: int = 0
    in_flight_max: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.on_request is not None:
            await self.on_request()
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: bytes) -> web.StreamResponse:
        try:
            if self.standard:
                Webhook(self.secret or "").verify(body, dict(request.headers))
            verify(self.secret or "", request.headers.get(SIGNATURE_HEADER, ""), body, now_s=time.time())
        except (WebhookVerificationError, SignatureInvalid):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.verified.append(dict(request.headers))
        payload = json.loads(body, parse_float=Decimal)
        self.requests.append((time.monotonic(), payload["id"]))
        fault = self.faults.pop(0) if self.faults else None
        if fault is None and self.refuse is not None and self.refuse(payload):
            fault = "500"
        if fault == "500":
            return web.Response(status=500, text="injected failure")
        if fault == "slow":
            await asyncio.sleep(SLOW_S)  # the deliverer gives up first; its disconnect cancels this handler
            return web.Response(status=200)
        if fault == "reset":
            _reset(request)
        # Recorded before answering: a deliverer that dies before it reads the answer sends it again.
        self.accepted.append(Received(payload["id"], payload, dict(request.headers), body))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(status=204)

    def ids(self) -> list[int]:
        return [r.event_id for r in self.accepted]

    def first_receipts(self) -> list[Received]:
        """Accepted deliveries without repeats (at least once allows them), in arrival order."""
        seen: set[int] = set()
        firsts = []
        for received in self.accepted:
            if received.event_id not in seen:
                seen.add(received.event_id)
                firsts.append(received)
        return firsts


def _reset(request: web.Request) -> None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:  # linger 0: close() sends RST, the client sees "connection reset"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if transport is not None:
        transport.abort()
    raise asyncio.CancelledError


@asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    async with serve(app) as base_url:
        receiver.url = base_url + "/hooks"
        yield receiver


# ---- helpers ---------------------------------------------------------------------------------


async def subscribe(pool: asyncpg.Pool, receiver: Receiver, events: list[str] | None = None) -> storage.Subscription:
    created = await create_subscription(
        pool, CIPHER, EgressPolicy(SETTINGS.provider_allowlist), url=receiver.url, event_types=events
    )
    receiver.secret = created.secret
    return created.subscription


@asynccontextmanager
async def delivering(pool: asyncpg.Pool, options: DeliveryOptions = FAST) -> AsyncIterator[asyncio.Task]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_deliveries(pool, SETTINGS, stop, cipher=CIPHER, options=options))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), WAIT_S)


async def write_card(ledger: Ledger, clock: Clock, tag: str, currency: str = "USD") -> str:
    """Issued, credited 100, debited 30.50, 20 of it settled, 5 cancelled: five events."""
    issued = await ledger.issue(
        IssueCard(
            relation_name=tag,
            caption="c",
            profile_id=f"{tag}@example.com",
            currency=currency,
            expiring_date=clock.now + timedelta(days=365),
        )
    )
    card_id = str(issued.card.id)
    await ledger.create_transaction(card_id, operation="Credit", value=Decimal(100), description="load", request_id="l")
    debit = await ledger.create_transaction(
        card_id, operation="Debit", value=Decimal("30.50"), description="order", request_id="o"
    )
    await ledger.settle(card_id, debit.id, value=Decimal(20), request_id="s")
    await ledger.cancel(card_id, debit.id, value=Decimal(5), request_id="c")
    return card_id


async def write_cards(ledger: Ledger, clock: Clock, count: int, tag: str) -> list[str]:
    return list(await asyncio.gather(*(write_card(ledger, clock, f"{tag}-{n}") for n in range(count))))


async def ledger_order(store: EventStore, after: Checkpoint) -> list[RecordedEvent]:
    return await store.read_all(after, 10_000)


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def versions_per_card(received: list[Received]) -> dict[str, list[int]]:
    per_card: dict[str, list[int]] = {}
    for r in received:
        if "cardId" in r.payload:
            per_card.setdefault(r.payload["cardId"], []).append(r.payload["version"])
    return per_card


# ---- delivery ----------------------------------------------------------------------------------


async def test_every_event_arrives_signed_once_in_ledger_order(pool, ledger, clock, store):
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        cards = await write_cards(ledger, clock, 4, "order")
        registry = ProviderRegistry(store, CIPHER, "VtexGiftCard")
        await registry.put(
            ProviderSpec(id="ext", service_url="https://provider.example.com/api"), Credentials("k", "t")
        )
        await registry.remove("ext")
        expected = await ledger_order(store, subscription.checkpoint)
        assert len(expected) == 4 * 5 + 2

        async with delivering(pool):
            await wait_for(lambda: len(receiver.accepted) >= len(expected), "every event delivered")

    assert receiver.bad_signatures == 0
    assert receiver.ids() == [e.position for e in expected]  # the global order, each exactly once
    assert all(versions == [1, 2, 3, 4, 5] for versions in versions_per_card(receiver.accepted).values())
    assert set(versions_per_card(receiver.accepted)) == set(cards)
    for received in receiver.accepted:
        assert received.headers[WEBHOOK_ID_HEADER] == str(received.payload["id"])
        assert received.headers[EVENT_ID_HEADER] == str(received.payload["id"])
        assert received.headers[EVENT_TYPE_HEADER] == received.payload["type"]
    card = [r.payload for r in receiver.accepted if r.payload.get("cardId") == cards[0]]
    assert [p["type"] for p in card] == CARD_TYPES
    issued, credited, debited, settled, cancelled = card
    assert issued["data"]["currency"] == "USD" and issued["data"]["relationName"] == "order-0"
    assert "codeTail" not in issued["data"] and "originatorTopic" not in issued["data"]
    assert debited["data"]["value"] == Decimal("30.50") and debited["data"]["currency"] == "USD"
    assert str(debited["data"]["value"]) == "30.50"  # exact, in major units, with the currency's decimals
    assert credited["data"]["value"] == Decimal("100.00") and credited["data"]["transactionId"]
    assert settled["data"]["value"] == Decimal("20.00") and settled["data"]["oid"]
    assert cancelled["data"]["released"] == Decimal("5.00") and cancelled["data"]["refunded"] == Decimal("0.00")
    assert debited["occurredAt"] == clock.now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    provider_events = [r for r in receiver.accepted if r.payload["type"] == "provider.changed"]
    assert [r.payload["data"]["change"] for r in provider_events] == ["registered", "removed"]
    assert provider_events[0].payload["providerId"] == "ext"
    assert all(b"credentials" not in r.body for r in provider_events)  # sealed or not, never sent

    [listed] = await storage.list_subscriptions(pool)
    assert listed.delivered == len(expected) and listed.lag_events == 0 and listed.attempts == 0
    assert listed.checkpoint == subscription.checkpoint.past(expected)


async def test_a_filter_delivers_only_its_types_and_voided_holds_arrive(pool, ledger, clock, store):
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver, ["card.debited", "card.voided"])
        card_id = await write_card(ledger, clock, "filtered", currency="BHD")
        debit = await ledger.create_transaction(
            card_id, operation="Debit", value=Decimal("1.234"), description="held", request_id="h"
        )
        clock.advance(timedelta(hours=2))
        await ledger.void_expired_hold(card_id, debit.id, hold_ttl=timedelta(hours=1))
        expected = await ledger_order(store, subscription.checkpoint)

        async with delivering(pool):
            await wait_for(lambda: len(receiver.accepted) >= 3, "debits and the void delivered")
            await wait_for(lambda: _lag_is_zero(pool, subscription.id), "the checkpoint past the filtered-out events")

    assert [r.payload["type"] for r in receiver.accepted] == ["card.debited", "card.debited", "card.voided"]
    voided = receiver.accepted[-1].payload
    assert voided["data"]["released"] == Decimal("1.234") and voided["data"]["currency"] == "BHD"
    assert str(voided["data"]["value"]) == "1.234"
    assert voided["id"] == expected[-1].position
    [listed] = await storage.list_subscriptions(pool)
    assert listed.checkpoint == subscription.checkpoint.past(expected) and listed.delivered == 3


async def _lag_is_zero(pool: asyncpg.Pool, subscription_id: str) -> bool:
    return (await storage.get(pool, subscription_id)).lag_events == 0


async def test_a_failing_receiver_recovers_and_gets_everything_in_order(pool, ledger, clock, store):
    options = replace(FAST, backoff_base_s=0.05, backoff_max_s=0.4)
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        receiver.faults = ["500", "reset", "slow", "500", "reset", "500"]
        cards = await write_cards(ledger, clock, 3, "flaky")
        expected = await ledger_order(store, subscription.checkpoint)

        async with delivering(pool, options):
            await wait_for(lambda: len(receiver.requests) >= 3, "three refusals")
            blocked = await storage.get(pool, subscription.id)  # on its first event, in backoff
            await wait_for(
                lambda: {r.event_id for r in receiver.accepted} >= {e.position for e in expected}, "recovery"
            )
            await wait_for(lambda: _lag_is_zero(pool, subscription.id), "the recovered checkpoint stored")

    assert receiver.bad_signatures == 0
    assert [r.event_id for r in receiver.first_receipts()] == [e.position for e in expected]
    assert all(v == [1, 2, 3, 4, 5] for v in versions_per_card(receiver.first_receipts()).values())
    assert set(versions_per_card(receiver.accepted)) == set(cards)
    # The first event was refused six times in a row; each retry waited longer than the one before.
    first = expected[0].position
    tries = [at for at, event_id in receiver.requests if event_id == first]
    assert len(tries) == 7
    gaps = [later - earlier for earlier, later in zip(tries, tries[1:], strict=False)]
    for attempt, gap in enumerate(gaps, start=1):
        assert gap >= options.backoff_s(attempt) - 0.005, (attempt, gaps)
    assert blocked.attempts >= 2 and blocked.last_error and blocked.checkpoint == subscription.checkpoint
    [listed] = await storage.list_subscriptions(pool)
    assert listed.attempts == 0 and listed.last_error is None and listed.dead_letters == 0


async def test_after_attempts_max_failures_an_event_is_dead_lettered_and_delivery_goes_on(pool, ledger, clock, store):
    options = replace(FAST, attempts_max=3)
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        receiver.refuse = lambda payload: payload["type"] == "card.credited"
        await write_cards(ledger, clock, 2, "dead")
        expected = await ledger_order(store, subscription.checkpoint)
        credited = [e.position for e in expected if e.type.endswith(".Credited")]

        async with delivering(pool, options):
            await wait_for(lambda: len(receiver.accepted) >= len(expected) - 2, "every other event")
            letters, total = await storage.dead_letters(pool, subscription.id, 0, 10)
            assert total == 2 and sorted(letter.position for letter in letters) == sorted(credited)
            assert all(letter.attempts == 3 and letter.last_error.startswith("HTTP 500") for letter in letters)
            assert all(sum(1 for _, i in receiver.requests if i == position) == 3 for position in credited)
            assert receiver.ids() == [e.position for e in expected if e.position not in credited]

            receiver.refuse = None  # the receiver is fixed; an operator retries the dead letters
            assert await storage.request_retry(pool, subscription.id) == 2
            await wait_for(lambda: len(receiver.accepted) == len(expected), "the dead letters redelivered")
            await wait_for(lambda: _no_dead_letters(pool, subscription.id), "the dead letters gone")

    assert sorted(receiver.ids()) == sorted(e.position for e in expected)
    assert sorted(receiver.ids()[-2:]) == sorted(credited)  # redelivered last: out of order, as dead letters are


async def _no_dead_letters(pool: asyncpg.Pool, subscription_id: str) -> bool:
    return (await storage.dead_letters(pool, subscription_id, 0, 1))[1] == 0


async def test_replay_from_a_position_sends_those_events_again(pool, ledger, clock, store):
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        await write_cards(ledger, clock, 2, "replay")
        expected = await ledger_order(store, subscription.checkpoint)
        async with delivering(pool):
            await wait_for(lambda: len(receiver.accepted) == len(expected), "first delivery")
            from_position = expected[3].position
            replayed = await storage.replay(pool, subscription.id, from_position)
            wanted = {
                e.position for e in expected if e.position >= from_position
            }  # on Citus: each node numbers its own
            assert replayed.lag_events >= len(wanted)
            await wait_for(lambda: wanted <= set(receiver.ids()[len(expected) :]), "the replay")
            await wait_for(lambda: _lag_is_zero(pool, subscription.id), "the replay's end")

        with pytest.raises(InvalidRequest, match="no event at position"):
            await storage.replay(pool, subscription.id, max(e.position for e in expected) + 1)
        with pytest.raises(storage.SubscriptionNotFound):
            await storage.replay(pool, "wh_unknown", 1)

    again = receiver.ids()[len(expected) :]
    assert wanted <= set(again) and len(again) == len(set(again))
    assert again == [e.position for e in expected if e.position in set(again)]  # in ledger order again


async def test_a_signature_is_bound_to_body_secret_and_time(pool, ledger, clock):
    async with receiving() as receiver:
        await subscribe(pool, receiver)
        await write_card(ledger, clock, "signed")
        async with delivering(pool):
            await wait_for(lambda: len(receiver.accepted) == 5, "deliveries")
    received = receiver.accepted[0]
    header = received.headers[SIGNATURE_HEADER]
    signed_at = int(header.split(",")[0].removeprefix("t="))
    assert abs(signed_at - time.time()) < 60
    assert verify(receiver.secret, header, received.body, now_s=signed_at + 1) == signed_at
    with pytest.raises(SignatureInvalid, match="from now"):  # a captured delivery replayed later
        verify(receiver.secret, header, received.body, now_s=signed_at + TOLERANCE_S + 1)
    with pytest.raises(SignatureInvalid, match="does not match"):
        verify(receiver.secret, header, received.body.replace(b'"card.', b'"card.x'), now_s=signed_at)
    with pytest.raises(SignatureInvalid, match="does not match"):
        verify("whsec_another", header, received.body, now_s=signed_at)
    with pytest.raises(SignatureInvalid, match="does not match"):  # a fresh timestamp on an old MAC
        fresh = f"t={signed_at + 600},v1={header.split('v1=')[1]}"
        verify(receiver.secret, fresh, received.body, now_s=signed_at + 600)
    with pytest.raises(SignatureInvalid, match="must look like"):
        verify(receiver.secret, "v1=abc", received.body, now_s=signed_at)
    assert verify("s", sign(["s"], 100, b"{}"), b"{}", now_s=100) == 100
    assert verify("t", sign(["s", "t"], 100, b"{}"), b"{}", now_s=100) == 100  # either secret, while rotating


async def test_the_standardwebhooks_library_verifies_deliveries_and_retries_and_refuses_tampering(pool, ledger, clock):
    async with receiving() as receiver:
        await subscribe(pool, receiver)
        receiver.faults = ["500"]  # the first event is refused once, then sent again
        await write_card(ledger, clock, "standard")
        async with delivering(pool):
            await wait_for(lambda: len(receiver.accepted) == 5, "deliveries")

    assert receiver.bad_signatures == 0  # every request, the refused one included, verified
    first = receiver.accepted[0]
    tries = [headers for headers in receiver.verified if headers[WEBHOOK_ID_HEADER] == first.headers[WEBHOOK_ID_HEADER]]
    assert len(tries) == 2  # the retry carries the same id, for receivers to dedupe on
    assert [r.headers[WEBHOOK_ID_HEADER] for r in receiver.accepted] == [str(r.event_id) for r in receiver.accepted]
    assert len(first.headers[WEBHOOK_SIGNATURE_HEADER].split(" ")) == 1  # one secret, one signature

    webhook = Webhook(receiver.secret)
    assert webhook.verify(first.body, first.headers) == json.loads(first.body)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        webhook.verify(first.body.replace(b'"card.issued"', b'"card.debited"'), first.headers)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):  # the id is signed
        webhook.verify(first.body, first.headers | {WEBHOOK_ID_HEADER: str(first.event_id + 1)})
    later = str(int(first.headers[WEBHOOK_TIMESTAMP_HEADER]) + 1)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):  # and so is the time
        webhook.verify(first.body, first.headers | {WEBHOOK_TIMESTAMP_HEADER: later})
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(new_secret()).verify(first.body, first.headers)
    # The secret is the spec's: whsec_ and the standard base64 of 32 random bytes.
    assert len(base64.b64decode(receiver.secret.removeprefix("whsec_"), validate=True)) == SECRET_BYTES


async def give_secret(pool: asyncpg.Pool, subscription_id: str, secret: str) -> None:
    """A subscription made before Standard Webhooks: its secret was ``whsec_`` + URL-safe base64."""
    async with pool.acquire() as connection:
        await storage.set_sealed_secret(connection, subscription_id, seal_secrets(CIPHER, subscription_id, [secret]))


async def test_secrets_from_before_standard_webhooks_keep_working_and_rotate(pool, ledger, clock, caplog):
    caplog.set_level(logging.INFO)
    not_base64 = "whsec_-" + secrets.token_urlsafe(SECRET_BYTES)[1:]  # as three in four of them are
    base64_too = "whsec_" + secrets.token_urlsafe(SECRET_BYTES).translate(str.maketrans("-_", "AB"))
    async with receiving() as old, receiving() as lucky:
        subscription = await subscribe(pool, old)
        await give_secret(pool, subscription.id, not_base64)
        old.secret, old.standard = not_base64, False
        await give_secret(pool, (await subscribe(pool, lucky)).id, base64_too)
        lucky.secret = base64_too  # the receiver's library reads it as it is
        await write_card(ledger, clock, "legacy")
        async with delivering(pool):
            await wait_for(lambda: len(old.accepted) == len(lucky.accepted) == 5, "deliveries")
        assert old.bad_signatures == lucky.bad_signatures == 0
        assert not any(WEBHOOK_SIGNATURE_HEADER in r.headers for r in old.accepted)  # rather than a wrong one
        asked = [r.getMessage() for r in caplog.records if "rotate-secret" in r.getMessage()]
        assert len(asked) == 1 and subscription.id in asked[0]

        new = await rotate_secret(pool, CIPHER, subscription.id)
        old.secret, old.standard = new, True  # the receiver switches to the new secret (and the library)
        await write_card(ledger, clock, "rotating")
        async with delivering(pool):
            # At least once: the deliverer stopped above may send its last event again, so count events.
            await wait_for(lambda: len(old.first_receipts()) == 10, "deliveries while rotating")
        for received in old.accepted[5:]:  # and one still holding the old secret accepts them too
            verify(not_base64, received.headers[SIGNATURE_HEADER], received.body, now_s=time.time())

        assert await drop_previous_secret(pool, CIPHER, subscription.id) is True
        assert await drop_previous_secret(pool, CIPHER, subscription.id) is False
        await write_card(ledger, clock, "rotated")
        async with delivering(pool):
            await wait_for(lambda: len(old.first_receipts()) == 15, "deliveries after the rotation")
        assert old.bad_signatures == 0
        with pytest.raises(SignatureInvalid, match="does not match"):
            verify(not_base64, old.accepted[-1].headers[SIGNATURE_HEADER], old.accepted[-1].body, now_s=time.time())
        with pytest.raises(storage.SubscriptionNotFound):
            await rotate_secret(pool, CIPHER, "wh_unknown")

    assert not any(secret in caplog.text for secret in (not_base64, base64_too, new))


async def test_two_deliverers_never_send_one_subscription_at_once(pool, database_url, ledger, clock, store):
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        receiver.delay_s = 0.005
        await write_cards(ledger, clock, 6, "pair")
        expected = await ledger_order(store, subscription.checkpoint)
        options = replace(FAST, batch_events_max=4, batches_per_turn_max=1)
        other_pool = await create_pool(database_url, size_min=1, size_max=4)
        try:
            async with delivering(pool, options), delivering(other_pool, options):
                await wait_for(lambda: len(receiver.accepted) >= len(expected), "every event")
                await asyncio.sleep(0.2)  # room for a duplicate to show up, if one were sent
        finally:
            await other_pool.close()

    assert receiver.ids() == [e.position for e in expected]  # none twice, none out of order
    assert receiver.in_flight_max == 1


async def test_subscriptions_always_due_do_not_starve_the_others(pool, ledger, clock, store):
    """One slot, one event a turn, three subscriptions with a backlog each: the slot goes round all
    three, where it went to the first (by id) until its backlog was gone."""
    async with receiving() as first, receiving() as second, receiving() as third:
        receivers = [first, second, third]
        for receiver in receivers:
            await subscribe(pool, receiver)
        await write_cards(ledger, clock, 2, "fair")
        options = replace(FAST, subscriptions_concurrent_max=1, batch_events_max=1, batches_per_turn_max=1)
        async with delivering(pool, options):
            await wait_for(lambda: sum(len(r.accepted) for r in receivers) >= 6, "six deliveries")

    assert all(len(receiver.accepted) >= 1 for receiver in receivers), [len(r.accepted) for r in receivers]


async def test_a_subscription_behind_takes_another_turn_before_the_next_poll(pool, ledger, clock, store):
    """A turn is two events here and the next poll a minute away: the backlog goes out turn after
    turn, where it stopped after the first turn's two events until the next poll (a busy store's
    subscription was held to a turn's events a poll interval, 2,000 a second as shipped)."""
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        await write_cards(ledger, clock, 4, "backlog")
        expected = await ledger_order(store, subscription.checkpoint)
        options = replace(FAST, batch_events_max=1, batches_per_turn_max=2, poll_interval_s=60.0)
        async with delivering(pool, options):
            await wait_for(lambda: len(receiver.accepted) >= len(expected), "the whole backlog, in one poll")

    assert receiver.ids() == [e.position for e in expected]


async def test_polls_come_less_often_when_more_stores_are_due_than_the_pace_allows(pool, ledger, clock, monkeypatch):
    """Six subscriptions due, four polled turns a second at most: the first poll's turns deliver every
    one, and the next poll waits 1.5 s, where polls came every 0.02 s (a turn each time for every
    subscription with a new event: a cost per store per poll, whatever the events)."""
    polls = 0
    listed = storage.due_subscriptions

    async def counted(pool: asyncpg.Pool) -> Any:
        nonlocal polls
        polls += 1
        return await listed(pool)

    monkeypatch.setattr(storage, "due_subscriptions", counted)
    async with AsyncExitStack() as stack:
        receivers = [await stack.enter_async_context(receiving()) for _ in range(6)]
        for receiver in receivers:
            await subscribe(pool, receiver)
        await write_card(ledger, clock, "paced")
        began = time.monotonic()
        async with delivering(pool, replace(FAST, polled_turns_per_s_max=4.0)):
            await wait_for(lambda: all(r.accepted for r in receivers), "every subscription's event")
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
            polls_in_a_second = polls

    assert polls_in_a_second == 1
    assert DeliveryOptions().poll_wait_s(1) == 0.5 and DeliveryOptions().poll_wait_s(300) == 3.0


async def test_a_deliverer_killed_mid_post_loses_nothing(pool, ledger, clock, store):
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        await write_cards(ledger, clock, 2, "crash")
        expected = await ledger_order(store, subscription.checkpoint)
        receiver.delay_s = SLOW_S  # accepted, but the answer comes late
        async with delivering(pool, replace(FAST, timeout_s=5.0)) as first:
            await wait_for(lambda: len(receiver.accepted) == 1, "the first event received")
            first.cancel()  # dies before it learns the receiver took it
        receiver.delay_s = 0.0
        async with delivering(pool):
            await wait_for(lambda: len(receiver.accepted) >= len(expected) + 1, "the rest")

    assert receiver.ids() == [expected[0].position] + [e.position for e in expected]  # at least once
    assert [r.event_id for r in receiver.first_receipts()] == [e.position for e in expected]


async def test_events_written_while_a_batch_is_posted_are_delivered_after_it(pool, ledger, clock, store):
    """The deliverer polls on while a batch POSTs; a short batch may skip ahead only to the head read
    before its own read, never to a later poll's, which holds events the batch never saw."""
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        await write_card(ledger, clock, "before")
        receiver.delay_s = 0.1  # five POSTs: half a second, many polls
        async with delivering(pool):
            await wait_for(lambda: len(receiver.accepted) >= 1, "the batch begun")
            await write_card(ledger, clock, "during")
            expected = await ledger_order(store, subscription.checkpoint)
            await wait_for(lambda: len(receiver.first_receipts()) == len(expected), "the events written during it")

    assert sorted(receiver.ids()) == sorted(e.position for e in expected)  # each once, none skipped


async def test_every_due_subscription_is_listed_however_many(pool, ledger, clock):
    """Many stores may hold more than a thousand subscriptions between them: the poll lists every
    due one, where it kept the first 1,000 by id, and the rest never had a turn while those were due."""
    many = 1_001
    await pool.execute(
        """
        insert into webhook_subscriptions (id, url, secret, checkpoint)
        select 'wh_many_' || lpad(n::text, 5, '0'), 'http://127.0.0.1:9/hooks', 'sealed', '{}'::jsonb
        from generate_series(1, $1) n
        """,
        many,
    )
    await write_card(ledger, clock, "many")
    due, _ = await storage.due_subscriptions(pool)
    assert len(due) == many and "wh_many_01001" in due


async def test_a_polled_subscriptions_batch_does_not_look_up_its_store(pool, ledger, clock, store, monkeypatch):
    """The poll lists each due subscription with its store: a batch does not ask again (with many
    stores, that was a pool checkout and a query for every batch of every store)."""
    async with receiving() as receiver:
        await subscribe(pool, receiver)
        await write_card(ledger, clock, "store")
        asked: list[str] = []
        tenant_of = storage.tenant_of
        monkeypatch.setattr(storage, "tenant_of", lambda pool, key: asked.append(key) or tenant_of(pool, key))
        async with delivery_client(EgressPolicy(SETTINGS.provider_allowlist)) as client:
            assert await Deliverer(pool, client, CIPHER, FAST).run_once() == 5

    assert asked == [] and len(receiver.accepted) == 5


async def test_a_batch_looks_for_dead_letters_to_retry_only_when_the_poll_found_some(
    pool, ledger, clock, store, monkeypatch
):
    """The poll says which subscriptions have dead letters an operator asked to retry: the others'
    batches do not ask (a query for every batch of every store; the retry itself is
    test_after_attempts_max_failures_an_event_is_dead_lettered_and_delivery_goes_on)."""
    async with receiving() as receiver:
        await subscribe(pool, receiver)
        await write_card(ledger, clock, "noretry")
        looked: list[str] = []
        retries_due = storage.retries_due
        monkeypatch.setattr(
            storage, "retries_due", lambda c, key, limit: looked.append(key) or retries_due(c, key, limit)
        )
        async with delivery_client(EgressPolicy(SETTINGS.provider_allowlist)) as client:
            assert await Deliverer(pool, client, CIPHER, FAST).run_once() == 5

    assert looked == [] and len(receiver.accepted) == 5


async def test_a_lock_a_cancelled_batch_cannot_release_leaves_with_its_connection(database_url, monkeypatch):
    """The webhook pools skip asyncpg's full release reset (which unlocks every advisory lock): a
    slot cancelled again while it unlocks (a deliverer told to stop twice) must not hand its
    connection back to the pool still holding the subscription's lock, or no deliverer would
    take the subscription again."""
    monkeypatch.setattr(storage, "_UNLOCK", "select pg_advisory_unlock($1, hashtext($2)) from pg_sleep(0.5)")
    pool = await create_pool(database_url, size_min=1, size_max=1, session_state=False)
    observer = await asyncpg.connect(database_url)
    try:

        async def batch() -> None:
            async with pool.acquire() as connection:
                lock = storage.SlotLock(connection)
                try:
                    assert await lock.take("wh_cancelled", DEFAULT_TENANT)
                    await connection.execute("select pg_sleep(30)")
                finally:
                    await lock.release()

        task = asyncio.create_task(batch())
        await wait_for(lambda: _advisory_locks(observer, 1), "the batch holding its lock")
        task.cancel()  # in its statement: the lock is then being released...
        await asyncio.sleep(0.2)
        task.cancel()  # ...when the second one comes
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: _advisory_locks(observer, 0), "the lock released")
        async with pool.acquire() as connection:
            lock = storage.SlotLock(connection)
            assert await lock.take("wh_cancelled", DEFAULT_TENANT) and await _advisory_locks(observer, 1)
            await lock.release()
    finally:
        await observer.close()
        await pool.close()


async def test_a_slot_hands_its_lock_from_one_subscription_to_the_next_in_one_statement(
    database_url, pool, ledger, clock, store
):
    """A slot delivers the waiting subscriptions one after another on one connection: the previous
    one's unlock, the next one's store and its lock go in one statement (three round trips a batch
    were, with many stores), and no lock outlives the slot."""
    logged: list[str] = []
    slot_pool = await create_pool(database_url, size_min=2, size_max=2, session_state=False)  # the slot's, the poll's
    observer = await asyncpg.connect(database_url)
    try:
        async with slot_pool.acquire() as one, slot_pool.acquire() as other:
            for connection in (one, other):
                connection.add_query_logger(lambda query: logged.append(query.query))
        async with AsyncExitStack() as stack:
            receivers = [await stack.enter_async_context(receiving()) for _ in range(3)]
            subscriptions = [await subscribe(pool, receiver) for receiver in receivers]
            await write_card(ledger, clock, "handover")
            async with delivery_client(EgressPolicy(SETTINGS.provider_allowlist)) as client:
                assert await Deliverer(slot_pool, client, CIPHER, FAST).run_once() == 3 * 5
        assert [len(receiver.accepted) for receiver in receivers] == [5, 5, 5]
        for subscription in subscriptions:
            assert await _advisory_locks(observer, 0, subscription.id)
    finally:
        await observer.close()
        await slot_pool.close()
    hand_overs = [q for q in logged if "pg_try_advisory_lock" in q]
    unlocks_alone = [q for q in logged if "pg_advisory_unlock" in q and q not in hand_overs]
    assert len(hand_overs) == 3 and all("set_config" in q and "pg_advisory_unlock" in q for q in hand_overs)
    assert len(unlocks_alone) == 1  # the last subscription's, as the slot ends


async def _advisory_locks(connection: asyncpg.Connection, expected: int, subscription_id: str = "wh_cancelled") -> bool:
    """Whether ``expected`` sessions hold the subscription's lock (a two-key lock: its keys as oids)."""
    held = await connection.fetchval(
        """
        select count(*) from pg_locks
        where locktype = 'advisory' and objsubid = 2 and granted
          and classid::int8 = $1 and objid::int8 = hashtext($2)::int8 & 4294967295
        """,
        storage.LOCK_CLASS,
        subscription_id,
    )
    return held == expected


async def test_a_batch_stores_its_checkpoint_once_not_per_event(pool, ledger, clock, store):
    """The checkpoint moves at the end of a batch: no UPDATE and commit per delivered event."""
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        await write_cards(ledger, clock, 2, "once")
        expected = await ledger_order(store, subscription.checkpoint)
        stored_seen: list[Checkpoint] = []
        receiver.on_request = lambda: _remember_checkpoint(pool, subscription.id, stored_seen)
        async with delivering(pool, replace(FAST, batch_events_max=len(expected))):
            await wait_for(lambda: _lag_is_zero(pool, subscription.id), "every event delivered")

    assert receiver.ids() == [e.position for e in expected]
    assert stored_seen == [subscription.checkpoint] * len(expected)  # one batch: stored after its last POST
    listed = await storage.get(pool, subscription.id)
    assert listed.delivered == len(expected) and listed.checkpoint == subscription.checkpoint.past(expected)


async def _remember_checkpoint(pool: asyncpg.Pool, subscription_id: str, seen: list[Checkpoint]) -> None:
    seen.append((await storage.get(pool, subscription_id)).checkpoint)


async def test_a_deliverer_stopped_mid_batch_keeps_what_it_delivered(pool, ledger, clock, store):
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        await write_cards(ledger, clock, 2, "stop")
        expected = await ledger_order(store, subscription.checkpoint)
        receiver.faults = ["", "", "slow"]  # two accepted, then one the deliverer is stopped waiting for
        async with delivering(pool, replace(FAST, timeout_s=5.0)) as first:
            await wait_for(lambda: len(receiver.requests) == 3, "the third event sent")
            first.cancel()
        stopped_at = await storage.get(pool, subscription.id)
        async with delivering(pool):
            await wait_for(lambda: len(receiver.accepted) >= len(expected), "the rest")

    assert stopped_at.checkpoint == subscription.checkpoint.past(expected[:2]) and stopped_at.delivered == 2
    assert receiver.ids() == [e.position for e in expected]  # the two delivered ones not sent again


async def test_a_deliverer_stopped_while_storing_its_checkpoint_stores_it(pool, ledger, clock, store, monkeypatch):
    """Stopped after its last POST, while the batch's checkpoint is being stored: the stop stores it
    all the same, so a deliverer started again sends none of those events twice."""
    async with receiving() as receiver:
        subscription = await subscribe(pool, receiver)
        await write_card(ledger, clock, "storing")
        expected = await ledger_order(store, subscription.checkpoint)
        storing = asyncio.Event()
        advance = storage.advance

        async def slow_first_advance(*args: Any) -> None:
            if not storing.is_set():
                storing.set()
                await asyncio.sleep(30)
            await advance(*args)

        monkeypatch.setattr(storage, "advance", slow_first_advance)
        async with delivering(pool) as first:
            await wait_for(storing.is_set, "the batch storing its checkpoint")
            first.cancel()
        stopped_at = await storage.get(pool, subscription.id)

    assert receiver.ids() == [e.position for e in expected]
    assert stopped_at.delivered == len(expected) and stopped_at.lag_events == 0


class _CardsNeverWalked(OrderedDict):
    """Remembered currencies that refuse to be walked: looking cards up is all a batch may do."""

    def keys(self) -> Any:
        raise AssertionError("a batch walked every card remembered")

    def __iter__(self) -> Any:
        raise AssertionError("a batch walked every card remembered")


async def test_a_batch_looks_its_cards_currencies_up_without_walking_every_card_remembered(pool):
    """The currencies of up to 10,000 cards are remembered; a batch of a few events asked for the
    set of its cards minus all of them, which walks all of them: 0.2 ms a batch on a small machine,
    with a hundred stores' batches every second."""
    from datetime import UTC, datetime

    currencies = CardCurrencies(cards_max=1000)
    currencies._known = _CardsNeverWalked((f"card-{n}", "BRL") for n in range(1000))
    debited = [
        RecordedEvent(
            position=n, source=0, seq=n, stream_id=f"card-{n}", version=2, type="GiftCard.Debited",
            data=b'{"value":100}', metadata={}, recorded_at=datetime(2026, 1, 2, tzinfo=UTC), hash=b"",
        )
        for n in (3, 5, 999)
    ]  # fmt: skip
    async with pool.acquire() as connection:
        await currencies.learn(connection, debited)
    assert [currencies.of(e.stream_id) for e in debited] == ["BRL"] * 3


def test_any_card_event_type_is_rendered_with_exact_amounts():
    from datetime import UTC, datetime

    event = RecordedEvent(
        position=7,
        source=0,
        seq=9,
        stream_id="card-1",
        version=4,
        type="giftcard.Frozen",  # a card event type this module has never heard of
        data=b'{"amount":1500,"reason_code":"fraud","order_info":{"x":1.10},"timestamp":"2026-01-01T00:00:00Z"}',
        metadata={},
        recorded_at=datetime(2026, 1, 2, tzinfo=UTC),
        hash=b"",
    )
    payload = json.loads(render(event, "JPY"), parse_float=Decimal)
    assert payload["type"] == "card.frozen" and payload["id"] == 7 and payload["version"] == 4
    assert payload["data"] == {
        "amount": 1500,
        "reasonCode": "fraud",
        "orderInfo": {"x": Decimal("1.10")},
        "currency": "JPY",
    }
    assert payload["occurredAt"] == "2026-01-02T00:00:00.000Z"  # no date of its own: when it was recorded


# ---- administration ----------------------------------------------------------------------------


async def test_subscriptions_refuse_bad_input_and_need_a_secret_key(pool):
    policy = EgressPolicy(SETTINGS.provider_allowlist)

    async def create(url: str, events: list[str] | None = None, cipher: CredentialsCipher = CIPHER):
        return await create_subscription(pool, cipher, policy, url=url, event_types=events)

    with pytest.raises(SecretKeyMissing, match="GIFTCARD_SECRET_KEY"):
        await create("http://127.0.0.1:9/hooks", cipher=CredentialsCipher(None))
    for url in ("ftp://127.0.0.1/x", "http:///x", "http://user:pw@127.0.0.1/x", "http://127.0.0.1:99999/x", ""):
        with pytest.raises(InvalidRequest, match="url"):
            await create(url)
    with pytest.raises(InvalidRequest, match="events must be"):
        await create("http://127.0.0.1:9/hooks", ["card.debited", "card.exploded"])
    with pytest.raises(InvalidRequest, match="internal address"):
        await create_subscription(pool, CIPHER, EgressPolicy(), url="http://127.0.0.1:9/hooks", event_types=None)
    assert await storage.list_subscriptions(pool) == []


@pytest.fixture
async def api(start_service):
    """The service, /api/webhooks and all (hub/app.py wires it in)."""
    return start_service


async def test_http_api_shows_the_secret_once_and_checks_roles(api, pool, caplog):
    caplog.set_level(logging.DEBUG)
    service = await api()
    async with receiving() as receiver:
        status, created, _ = await service.call(
            "POST", "/api/webhooks", {"url": receiver.url, "events": ["card.debited"], "description": "erp"}
        )
        assert status == 200 and created["secret"].startswith("whsec_") and created["events"] == ["card.debited"]
        receiver.secret = secret = created["secret"]
        hook = f"/api/webhooks/{created['id']}"

        async with delivering(pool):
            status, card, _ = await service.call(
                "POST",
                "/api/giftcards",
                {"relationName": "r", "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"},
            )
            assert status == 200, card
            await service.call(
                "POST",
                f"/api/giftcards/{card['id']}/transactions",
                {"operation": "Credit", "value": 10, "description": "d", "requestId": "1"},
            )
            await service.call(
                "POST",
                f"/api/giftcards/{card['id']}/transactions",
                {"operation": "Debit", "value": 2.5, "description": "d", "requestId": "2"},
            )
            await wait_for(lambda: len(receiver.accepted) == 1, "the debit delivered")
        assert receiver.accepted[0].payload["data"]["value"] == Decimal("2.50")

        answers = []
        for method, path, body in [
            ("GET", "/api/webhooks", None),
            ("GET", hook, None),
            ("GET", f"{hook}/dead-letters", None),
            ("POST", f"{hook}/dead-letters/retry", None),
            ("POST", f"{hook}/replay", {"fromPosition": 1}),
        ]:
            status, answer, headers = await service.call(method, path, body)
            assert status == 200, (method, path, answer)
            answers.append(json.dumps(answer))
        assert json.loads(answers[0])["items"][0]["id"] == created["id"]
        assert json.loads(answers[2])["items"] == [] and headers  # dead letters: none, paged
        assert json.loads(answers[4])["lagEvents"] >= 3  # replayed from the first event
        assert not any(secret in answer for answer in answers)

        status, refused, _ = await service.call("POST", "/api/webhooks", {"url": receiver.url, "events": ["nope"]})
        assert status == 400 and "events must be" in refused["error"]["message"]
        status, refused, _ = await service.call("POST", f"{hook}/replay", {"fromPosition": -1})
        assert status == 400
        status, refused, _ = await service.call("POST", "/api/webhooks", {"url": "http://10.1.2.3/hooks"})
        assert status == 400 and refused["error"]["code"] == "webhook_url_not_allowed"

        view_key, view_token = await auth.create_key(pool, auth.HUB, (auth.VIEW,))
        await asyncio.sleep(auth.KEY_REFRESH_S + 0.5)  # every process picks new keys up within this
        as_viewer = {"X-VTEX-API-AppKey": view_key, "X-VTEX-API-AppToken": view_token}
        assert (await service.call("GET", "/api/webhooks", headers=as_viewer))[0] == 200
        assert (await service.call("DELETE", hook, headers=as_viewer))[0] == 403
        assert (await service.call("POST", "/api/webhooks", {"url": receiver.url}, headers=as_viewer))[0] == 403
        anonymous = {"X-VTEX-API-AppKey": "", "X-VTEX-API-AppToken": ""}
        assert (await service.call("GET", "/api/webhooks", headers=anonymous))[0] == 401

        assert (await service.call("DELETE", hook))[0] == 200
        assert (await service.call("GET", hook))[0] == 404
        assert (await service.call("DELETE", hook))[0] == 404
        assert (await service.call("GET", f"{hook}/dead-letters"))[0] == 404

    stored = await pool.fetchval("select string_agg(secret, ' ') from webhook_subscriptions")
    assert stored is None or secret not in stored
    assert secret not in caplog.text and created["id"] in json.dumps(created)
    for route in service.app.router.routes():
        if route_path(route).startswith("/api/webhooks") and route.method != "HEAD":
            assert describe(route.method, route_path(route)) is not None, route_path(route)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="giftcard")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["webhooks", *argv])
    args.settings = Settings.from_env()  # as hub.cli.main reads them
    try:
        return args.run(args)
    except SystemExit as e:
        return int(e.code or 0)


async def test_cli_add_list_replay_dead_letters_run_and_remove(pool, database_url, ledger, clock, monkeypatch, capsys):
    monkeypatch.setenv("GIFTCARD_DATABASE_URL", database_url)
    monkeypatch.setenv("GIFTCARD_SECRET_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("GIFTCARD_PROVIDER_ALLOWLIST", "127.0.0.0/8")

    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(run_cli, *argv)
        out, err = capsys.readouterr()
        return code, out, err

    async with receiving() as receiver:
        code, out, _ = await cli("add", receiver.url, "--events", "card.debited,card.credited")
        assert code == 0
        subscription_id = out.split()[1]
        receiver.secret = secret = out.split()[-1]
        assert subscription_id.startswith("wh_") and secret.startswith("whsec_")

        await write_card(ledger, clock, "cli")
        code, out, _ = await cli("run", "--once")
        assert code == 0 and [r.payload["type"] for r in receiver.accepted] == ["card.credited", "card.debited"]

        code, out, _ = await cli("list")
        assert code == 0 and subscription_id in out and "card.credited,card.debited" in out
        code, out, _ = await cli("list", "--json")
        assert json.loads(out)["delivered"] == 2
        code, out, _ = await cli("replay", subscription_id, "--from-position", "1")
        assert code == 0 and "5 event(s)" in out
        code, out, err = await cli("dead-letters", subscription_id, "--retry")
        assert code == 0 and "0 dead letter(s) queued" in err
        assert secret not in "".join([out, err])

        code, out, _ = await cli("rotate-secret", subscription_id)
        [new_secret_shown] = [line.strip() for line in out.splitlines() if line.startswith("  whsec_")]
        assert code == 0 and new_secret_shown != secret and "--drop-previous" in out
        delivered_before = set(receiver.ids())
        await write_card(ledger, clock, "cli-rotating")
        code, out, _ = await cli("run", "--once")
        # Verified with the old secret by the receiver; the new one verifies them too.
        rotating = [r for r in receiver.accepted if r.event_id not in delivered_before]
        assert code == 0 and [r.payload["type"] for r in rotating] == ["card.credited", "card.debited"]
        assert all(len(r.headers[WEBHOOK_SIGNATURE_HEADER].split(" ")) == 2 for r in rotating)
        assert all(Webhook(new_secret_shown).verify(r.body, r.headers) for r in rotating)
        code, out, _ = await cli("rotate-secret", subscription_id, "--drop-previous")
        assert code == 0 and "no longer signs" in out
        receiver.secret = new_secret_shown
        await write_card(ledger, clock, "cli-rotated")
        accepted_before = len(receiver.accepted)
        code, out, _ = await cli("run", "--once")
        assert code == 0 and len(receiver.accepted) == accepted_before + 2 and receiver.bad_signatures == 0
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(receiver.accepted[-1].body, receiver.accepted[-1].headers)
        code, _, err = await cli("rotate-secret", "wh_unknown")
        assert code == 1 and "not found" in err

        assert (await cli("add", receiver.url, "--events", "card.nope"))[0] == 1
        assert (await cli("dead-letters", "wh_unknown"))[0] == 1
        assert (await cli("remove", subscription_id))[0] == 0
        code, _, err = await cli("remove", subscription_id)
        assert code == 1 and "not found" in err

        monkeypatch.delenv("GIFTCARD_SECRET_KEY")
        code, _, err = await cli("add", receiver.url)
        assert code == 1 and "GIFTCARD_SECRET_KEY" in err
