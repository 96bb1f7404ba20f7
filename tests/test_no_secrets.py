"""No secret leaks: tokens, provider credentials and full redemption codes appear in no log line,
error, metric, export or audit output of a real `giftcard serve` process and the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.conftest import TEST_SECRET_KEY
from tests.hub_process import HUB_KEY, HUB_TOKEN, PROVIDER_TOKEN, HubProcess
from tests.providers.reference import start_reference_provider

ROOT = Path(__file__).resolve().parents[1]
PARTNER_KEY, PARTNER_TOKEN = "partner-key-7c1e", "partner-token-9f3a51"
HUB_HEADERS = {"X-VTEX-API-AppKey": HUB_KEY, "X-VTEX-API-AppToken": HUB_TOKEN}


async def call(session: aiohttp.ClientSession, method: str, url: str, body=None) -> tuple[int, str]:
    async with session.request(method, url, json=body, headers=HUB_HEADERS) as response:
        return response.status, await response.text()


def cli(database_url: str, *args: str) -> str:
    env = {**os.environ, "GIFTCARD_DATABASE_URL": database_url, "GIFTCARD_SECRET_KEY": TEST_SECRET_KEY}
    done = subprocess.run(
        [sys.executable, "-m", "hub.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    return done.stdout + done.stderr


async def test_no_secret_reaches_logs_errors_metrics_or_exports(database_url, tmp_path, monkeypatch):
    monkeypatch.setenv("GIFTCARD_SECRET_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("GIFTCARD_PROVIDER_ALLOWLIST", "127.0.0.0/8")
    hub = HubProcess(database_url, tmp_path / "serve.log")
    answers: list[str] = []
    async with start_reference_provider(app_key=PARTNER_KEY, app_token=PARTNER_TOKEN) as partner:
        await hub.start()
        try:
            async with aiohttp.ClientSession() as session:
                base = hub.base_url
                status, created = await call(
                    session, "POST", f"{base}/api/giftcards",
                    {"relationName": "s-1", "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"},
                )  # fmt: skip
                assert status == 200, (created, hub.log_text()[-3000:])
                code = __import__("json").loads(created)["redemptionCode"]
                card_id = __import__("json").loads(created)["id"]
                steps = [
                    ("POST", f"{base}/api/giftcards/{card_id}/transactions",
                     {"operation": "Credit", "value": 10, "requestId": "l", "redemptionCode": code}),
                    ("POST", f"{base}/api/giftcards/{card_id}/transactions",  # refused: the token is wrong
                     {"operation": "Debit", "value": 1, "requestId": "w", "redemptionCode": code, "redemptionToken": "x"}),
                    ("POST", f"{base}/api/giftcards/_search", {"client": {"id": "x"}, "cart": {"redemptionCode": code}}),
                    ("POST", f"{base}/api/giftcards/_search",
                     {"client": {"id": "x"}, "cart": {"redemptionCode": code[:-1] + "0"}}),
                    ("PUT", f"{base}/api/giftcardproviders/Partner",
                     {"serviceUrl": partner.service_url, "appKey": PARTNER_KEY, "appToken": PARTNER_TOKEN}),
                    ("PUT", f"{base}/api/giftcardproviders/Wrong",
                     {"serviceUrl": partner.service_url, "appKey": PARTNER_KEY, "appToken": PARTNER_TOKEN + "x"}),
                    ("GET", f"{base}/api/giftcardproviders", None),
                    ("GET", f"{base}/api/giftcardproviders/Partner", None),
                    ("GET", f"{base}/api/giftcards/{card_id}", None),
                    ("GET", f"{base}/api/audit/cards/{card_id}", None),
                ]  # fmt: skip
                for method, url, body in steps:
                    answers.append((await call(session, method, url, body))[1])
                await asyncio.sleep(0.6)  # the registry refresh
                card = partner.state.issue_card(balance="5.00")
                for provider in ("Partner", "Wrong"):  # one works, one is refused: both are logged
                    answers.append(
                        (await call(session, "GET", f"{base}/api/giftcardproviders/{provider}/giftcards/{card.id}"))[1]
                    )
                answers.append((await call(session, "GET", f"{base}/metrics"))[1])
        finally:
            await hub.stop()
    export = tmp_path / "export.jsonl"
    outputs = [
        await asyncio.to_thread(
            cli, database_url, "export", "transactions", "--format", "jsonl", "--output", str(export)
        ),
        await asyncio.to_thread(cli, database_url, "audit", "card", card_id, "--json"),
        await asyncio.to_thread(cli, database_url, "audit", "verify"),
        await asyncio.to_thread(cli, database_url, "keys", "list"),
    ]
    everything = {
        "serve log": hub.log_text(),
        "answers after creation": "\n".join(answers),
        "export": export.read_text(),
        "cli output": "\n".join(outputs),
    }
    assert "request" in everything["serve log"] and card_id in everything["export"], "the sources are not empty"
    secrets = {
        "hub token": HUB_TOKEN,
        "provider token": PROVIDER_TOKEN,
        "partner app key": PARTNER_KEY,
        "partner app token": PARTNER_TOKEN,
        "redemption code": code,
        "redemption code without dashes": code.replace("-", ""),
        "secret key": TEST_SECRET_KEY,
    }
    leaks = [
        f"{name} in {where}" for name, secret in secrets.items() for where, text in everything.items() if secret in text
    ]
    assert leaks == []
