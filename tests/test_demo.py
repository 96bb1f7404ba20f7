"""`giftcard demo` fills a fresh database with a data set every surface can be tried on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from hub.http import auth
from tests.conftest import TEST_SECRET_KEY

ROOT = Path(__file__).resolve().parents[1]


def demo(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIFTCARD_DATABASE_URL": database_url, "GIFTCARD_SECRET_KEY": TEST_SECRET_KEY}
    return subprocess.run(
        [sys.executable, "-m", "hub.cli", "demo", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


async def test_demo_fills_a_fresh_database_once(start_service, pool, database_url):
    # The partner refuses the hub until the new credentials are read: those refusals must not open its breaker.
    service = await start_service(provider_breaker_failures_max=1000)
    done = await asyncio.to_thread(demo, database_url, "--cards", "150", "--base-url", service.base_url)
    assert done.returncode == 0, done.stderr
    assert "150 cards" in done.stdout and "DemoPartner registered" in done.stdout
    currencies = {
        r["c"]
        for r in await pool.fetch("select distinct data->>'currency' as c from events where type like '%.Issued'")
    }
    assert len(currencies) >= 3
    kinds = {
        r["t"].rsplit(".", 1)[1]
        for r in await pool.fetch("select distinct type as t from events where type like 'giftcard.%'")
    }
    assert {"Issued", "Credited", "Debited", "Settled", "Cancelled"} <= kinds
    again = await asyncio.to_thread(demo, database_url, "--cards", "10")
    assert again.returncode == 1 and "already holds demo data" in again.stdout

    # The partner is this service's /native, reachable through the hub like any external provider.
    # The registry is re-read every 0.5 s and stored credentials every auth.KEY_REFRESH_S: until both
    # have been, the partner is unknown or refuses the hub's new pair.
    card_id = await pool.fetchval("select stream_id from events where type like '%.Credited' order by position limit 1")
    deadline = asyncio.get_running_loop().time() + auth.KEY_REFRESH_S + 3
    while True:
        status, card, _ = await service.call("GET", f"/api/giftcardproviders/DemoPartner/giftcards/{card_id}")
        if status == 200 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status == 200 and card["provider"] == "DemoPartner", card
