"""Stored event names: stable, independent of where a class lives, and every name an earlier release
stored still loads, replays and verifies (tests/release_rows.py holds such a release's rows)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import msgspec

from ledger.application.commands import IssueCard, Ledger
from ledger.domain import topics
from ledger.domain.snapshot import SNAPSHOT_SCHEMA
from ledger.eventstore import codec
from projections.audit.auditors import verify
from projections.models.card_balances import one_balance
from tests import release_rows
from tests.audit_ledgers import NATIVE, catch_up

ROOT = Path(__file__).resolve().parents[1]
MOVE_TIMEOUT_S = 60


async def insert_release_card(pool) -> None:
    """The release's rows, inserted as they are: type, data and hash exactly as it wrote them."""
    for version, type_, data, hash_hex in release_rows.EVENTS:
        await pool.execute(
            "insert into events (stream_id, version, type, data, metadata, hash) values ($1, $2, $3, $4::jsonb, '{}', $5)",
            release_rows.STREAM_ID,
            version,
            type_,
            data,
            bytes.fromhex(hash_hex),
        )
    await pool.execute(
        "insert into snapshots (stream_id, version, hash, state) values ($1, $2, $3, $4)",
        release_rows.STREAM_ID,
        release_rows.SNAPSHOT_VERSION,
        bytes.fromhex(release_rows.EVENTS[-1][3]),
        release_rows.SNAPSHOT_STATE,
    )


async def test_new_events_are_stored_under_stable_names(ledger: Ledger, clock, pool):
    issued = await ledger.issue(
        IssueCard(
            relation_name="names",
            caption="c",
            profile_id="p",
            currency="USD",
            expiring_date=clock.now.replace(year=2027),
        )
    )
    card_id = str(issued.card.id)
    load = await ledger.create_transaction(
        card_id, operation="Credit", value=Decimal(10), description="", request_id="r1", order_info=None
    )
    spend = await ledger.create_transaction(
        card_id, operation="Debit", value=Decimal(4), description="", request_id="r2", order_info=None
    )
    await ledger.settle(card_id, spend.id, value=Decimal(1), request_id="r3")
    await ledger.cancel(card_id, load.id, value=Decimal(2), request_id="r4")
    types = [
        r["type"] for r in await pool.fetch("select type from events where stream_id = $1 order by version", card_id)
    ]
    assert types == [topics.ISSUED, topics.CREDITED, topics.DEBITED, topics.SETTLED, topics.CANCELLED]
    issue_data = json.loads(
        await pool.fetchval("select data::text from events where stream_id = $1 and version = 1", card_id)
    )
    assert issue_data["originator_topic"] == topics.CARD  # the card's own name: no module path anywhere


async def test_a_card_the_module_path_release_wrote_loads_takes_commands_and_verifies(store, clock, pool):
    await insert_release_card(pool)
    loader = Ledger(store, code_key=b"k" * 32, clock=clock)
    card = await loader.card(release_rows.STREAM_ID)
    await loader.snapshots_saved()
    assert (card.version, card.balance, card.currency) == (7, 8450, "USD")
    assert card.transactions["t-held"].voided_at == "2025-03-09T12:00:00+00:00"
    assert card.transactions["t-debit"].settled == 2000 and card.transactions["t-debit"].refunded == 450

    # The release's snapshot (schema 1) was stale: the card was rebuilt from its events and re-snapshotted.
    rebuilt = await pool.fetchrow("select version, state from snapshots where stream_id = $1", release_rows.STREAM_ID)
    assert rebuilt["version"] == 7 and rebuilt["state"] == release_rows.SNAPSHOT_STATE  # same version: kept
    stale = await verify(pool, NATIVE)  # a stale snapshot is never loaded: only its hash is checked
    assert stale.ok, [f.line() for f in stale.failures]
    ledger = Ledger(store, code_key=b"k" * 32, clock=clock)
    await ledger.create_transaction(
        release_rows.STREAM_ID,
        operation="Debit",
        value=Decimal("4.50"),
        description="",
        request_id="new",
        order_info=None,
    )
    assert (
        await pool.fetchval("select type from events where stream_id = $1 and version = 8", release_rows.STREAM_ID)
        == topics.DEBITED
    )
    assert await pool.fetchval("select count(*) from events where stream_id = $1", release_rows.STREAM_ID) == 8

    reloader = Ledger(store, code_key=b"k" * 32, clock=clock)
    reloaded = await reloader.card(release_rows.STREAM_ID)  # both spellings
    await reloader.snapshots_saved()
    assert (reloaded.version, reloaded.balance) == (8, 8000)
    rebuilt = await pool.fetchrow("select version, state from snapshots where stream_id = $1", release_rows.STREAM_ID)
    assert rebuilt["version"] == 8 and msgspec.msgpack.decode(rebuilt["state"])["schema"] == SNAPSHOT_SCHEMA

    await catch_up(pool)
    async with pool.acquire() as connection:
        balance = await one_balance(connection, release_rows.STREAM_ID)
    assert (balance["available"], balance["debited"], balance["credited"]) == (8000, 3050 - 1500 + 450, 10000)
    report = await verify(pool, NATIVE)
    assert report.ok, [f.line() for f in report.failures]


def test_stored_events_replay_after_the_card_module_moves():
    """Issue 22 item 1 moves ``giftcard.py`` into a sub-package. Here it is moved (loaded under another
    module path, the old one made unimportable, in a process of its own so that nothing is cached):
    the release's rows and rows written after the move replay to the same card."""
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys, uuid
        from datetime import UTC, datetime, timedelta
        sys.modules["ledger.domain.giftcard"] = None  # the old path is gone
        spec = importlib.util.spec_from_file_location("ledger.domain.card.giftcard", {str(ROOT / "ledger/domain/giftcard.py")!r})
        moved = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = moved
        spec.loader.exec_module(moved)
        import msgspec
        from ledger.eventstore.codec import domain_event, new_mapper
        from tests import release_rows

        card = None
        for version, type_, data, _ in release_rows.EVENTS:
            card = domain_event(uuid.UUID(release_rows.STREAM_ID), version, type_, msgspec.json.decode(data)).mutate(card)
        card.debit(transaction_id="after", value=50, description="", request_id="after", order_info=None,
                   client=None, now=datetime(2025, 6, 1, tzinfo=UTC))
        written = [new_mapper().to_stored_event(e) for e in card.collect_events()]
        again = None
        for version, type_, data, _ in release_rows.EVENTS:
            again = domain_event(uuid.UUID(release_rows.STREAM_ID), version, type_, msgspec.json.decode(data)).mutate(again)
        for s in written:
            again = domain_event(s.originator_id, s.originator_version, s.topic, msgspec.json.decode(s.state)).mutate(again)
        print(json.dumps({{"types": [s.topic for s in written], "balance": again.balance, "version": again.version,
                          "class": type(again).__module__, "transactions": sorted(again.transactions)}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=MOVE_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr
    replayed = json.loads(done.stdout)
    assert replayed == {
        "types": [topics.DEBITED],
        "balance": 8400,
        "version": 8,
        "class": "ledger.domain.card.giftcard",
        "transactions": ["after", "t-credit", "t-debit", "t-held"],
    }


async def test_loading_a_card_decodes_each_stored_event_once(store, clock, monkeypatch):
    """The store decodes an event's data once (to re-derive the bytes its hash covers) and hands that
    state on: the Mapper applies it without decoding the bytes again."""
    ledger = Ledger(store, code_key=b"k" * 32, clock=clock)
    issued = await ledger.issue(
        IssueCard(
            relation_name="once",
            caption="c",
            profile_id="p",
            currency="USD",
            expiring_date=clock.now.replace(year=2027),
        )
    )
    card_id = str(issued.card.id)
    for n, operation in enumerate(("Credit", "Debit")):
        await ledger.create_transaction(
            card_id, operation=operation, value=Decimal(1), description="", request_id=f"r{n}", order_info=None
        )
    decodes = []

    class Counting:
        def __init__(self, decoder):
            self.decoder = decoder

        def decode(self, data):
            decodes.append(data)
            return self.decoder.decode(data)

    monkeypatch.setattr(codec, "_decoder", Counting(codec._decoder))
    card = await Ledger(store, code_key=b"k" * 32, clock=clock).card(card_id)
    assert card.version == 3 and len(decodes) == 3
