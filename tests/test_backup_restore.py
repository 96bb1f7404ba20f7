"""Backups: a base backup plus a WAL archive, restored to an instant, is the ledger as it was then.

The README's "Backups and point-in-time restore" steps, on a real PostgreSQL 15 from Debian's
binaries (tests/pg_cluster.py): archive every WAL segment, take a base backup, keep writing, note an
instant T, write more, then restore the backup into a new folder replaying the archive up to T.
On the restored server ``giftcard audit verify`` passes, ``giftcard audit card ID --as-of T``
prints exactly what it printed on the original at T, and nothing written after T is there.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from ledger.application.commands import IssueCard, Ledger
from ledger.eventstore.store import EventStore
from ledger.postgres.migrate import upgrade
from projections import read_models
from projections.runner import ProjectionRunner
from tests.cards import issue_command
from tests.giftcard_cli import NATIVE, giftcard
from tests.pg_cluster import PgNode, archive_settings, owned_folder, pg_binaries_missing

pytestmark = pytest.mark.skipif(pg_binaries_missing() is not None, reason=str(pg_binaries_missing()))

DATABASE = "giftcard"
CLOCK_MARGIN_S = 0.3  # between the last commit before T, T, and the first commit after it
WAIT_S = 60.0


@dataclass
class Site:
    folder: Path
    archive: Path
    base_backup: Path
    origin: PgNode
    restored: PgNode


@pytest.fixture
def site() -> Iterator[Site]:
    folder = owned_folder("giftcard-backup-")
    archive = folder / "archive"
    archive.mkdir()
    shutil.chown(archive, "postgres", "postgres")
    site = Site(folder, archive, folder / "base", PgNode(folder, "origin"), PgNode(folder, "restored"))
    try:
        yield site
    finally:
        for node in (site.origin, site.restored):
            node.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def origin_pool(site: Site) -> AsyncIterator[asyncpg.Pool]:
    site.origin.initdb(port=str(site.origin.port), **archive_settings(site.archive))
    site.origin.start()
    admin = await asyncpg.connect(site.origin.url())
    try:
        await admin.execute(f"create database {DATABASE}")
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(site.origin.url(DATABASE), min_size=1, max_size=4)
    try:
        async with pool.acquire() as connection:
            await upgrade(connection)
        yield pool
    finally:
        await pool.close()


async def load(ledger: Ledger, card_id: str, value: int, request_id: str) -> str:
    transaction = await ledger.create_transaction(
        card_id, operation="Credit", value=Decimal(value), description="load", request_id=request_id
    )
    return transaction.id


async def spend(ledger: Ledger, card_id: str, value: str, request_id: str) -> str:
    transaction = await ledger.create_transaction(
        card_id, operation="Debit", value=Decimal(value), description="order", request_id=request_id
    )
    return transaction.id


async def new_card(ledger: Ledger, currency: str = "USD") -> str:
    command: IssueCard = issue_command(ledger.clock(), currency=currency)
    return str((await ledger.issue(command)).card.id)


async def balances(ledger: Ledger, card_ids: list[str]) -> dict[str, int]:
    """Each card's available balance in minor units, as the ledger loads it."""
    return {card_id: (await ledger.card(card_id)).balance for card_id in card_ids}


async def wait_until_archived(connection: asyncpg.Connection) -> None:
    """Closes the current WAL segment and waits until the archiver has copied it."""
    segment = await connection.fetchval("select pg_walfile_name(pg_switch_wal())")
    deadline = time.monotonic() + WAIT_S
    while (await connection.fetchval("select last_archived_wal from pg_stat_archiver") or "") < segment:
        if time.monotonic() > deadline:
            raise TimeoutError(f"WAL segment {segment} not archived within {WAIT_S} s")
        await asyncio.sleep(0.1)


async def wait_until_promoted(url: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        connection = await asyncpg.connect(url)
        try:
            if not await connection.fetchval("select pg_is_in_recovery()"):
                return
        finally:
            await connection.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the restored server was not promoted within {WAIT_S} s")
        await asyncio.sleep(0.1)


async def test_a_base_backup_and_the_wal_archive_restore_the_ledger_as_it_was_at_an_instant(site, origin_pool):
    ledger = Ledger(EventStore(origin_pool), b"k" * 32)  # the real clock: as-of and recovery share a timeline
    origin_env = {"GIFTCARD_DATABASE_URL": site.origin.url(DATABASE)}

    usd, jpy = await new_card(ledger), await new_card(ledger, "JPY")
    await load(ledger, usd, 100, "load")
    await load(ledger, jpy, 5000, "load")
    site.origin.base_backup_to(site.base_backup)

    # After the backup, before T: only the archive holds these.
    debit = await spend(ledger, usd, "30.50", "order-1")
    await ledger.settle(usd, debit, value=Decimal(20), request_id="s1")
    late = await new_card(ledger)
    await load(ledger, late, 40, "load")
    await ProjectionRunner(origin_pool, read_models(NATIVE)).catch_up()

    await asyncio.sleep(CLOCK_MARGIN_S)
    instant = (await origin_pool.fetchval("select now()")).isoformat()
    await asyncio.sleep(CLOCK_MARGIN_S)
    code, audited_at_t, err = await giftcard(origin_env, "audit", "card", usd, "--as-of", instant)
    assert code == 0, err
    assert debit in audited_at_t and "(after as-of)" not in audited_at_t
    balances_at_t = await balances(ledger, [usd, jpy, late])
    events_at_t = await origin_pool.fetchval("select count(*) from events")

    # After T: none of this may survive the restore.
    await spend(ledger, usd, "10", "after-t")
    await spend(ledger, jpy, "700", "after-t")
    after_t = await new_card(ledger)
    await ProjectionRunner(origin_pool, read_models(NATIVE)).catch_up()
    assert (await balances(ledger, [usd]))[usd] == balances_at_t[usd] - 1000  # cents
    async with origin_pool.acquire() as connection:
        await wait_until_archived(connection)
    site.origin.stop()  # the original is gone: the restore needs only the backup and the archive

    site.restored.restore_from(site.base_backup, site.archive, instant)
    site.restored.start()
    await wait_until_promoted(site.restored.url(DATABASE))
    restored_env = {"GIFTCARD_DATABASE_URL": site.restored.url(DATABASE)}

    code, out, err = await giftcard(restored_env, "audit", "verify")
    assert code == 0, out + err
    assert f"verified {events_at_t} event(s)" in out
    code, audited_after_restore, err = await giftcard(restored_env, "audit", "card", usd, "--as-of", instant)
    assert code == 0, err
    assert audited_after_restore == audited_at_t

    code, _, err = await giftcard(restored_env, "audit", "card", after_t)
    assert code == 2 and "not found" in err  # a card issued after T does not exist there
    restored = await asyncpg.create_pool(site.restored.url(DATABASE), min_size=1, max_size=2)
    try:
        assert await restored.fetchval("select count(*) from events") == events_at_t
        assert await balances(Ledger(EventStore(restored), b"k" * 32), [usd, jpy, late]) == balances_at_t
    finally:
        await restored.close()
