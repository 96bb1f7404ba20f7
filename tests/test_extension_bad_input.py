"""Our own endpoints (no VTEX spec to derive a fuzz from) under hostile input: every answer is a
4xx naming what was wrong, or a success; never a 5xx, and a refused request writes nothing."""

from __future__ import annotations

import base64
import json
from itertools import product

import aiohttp
import pytest

from tests.conftest import HUB_KEY, HUB_TOKEN

GARBAGE_IDS = ["x", "..%2F..%2Fetc%2Fpasswd", "%00", "9" * 300, "00000000-0000-0000-0000-000000000000", "%F0%9F%92%B3"]
BAD_BODIES = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'"text"',
    b'{"a":' * 40 + b"1" + b"}" * 40,
    b'{"url": "http://127.0.0.1/x\\u0000", "events": ["card.debited"]}',
    b'{"url": "\xed\xa0\x80"}',
    b'{"count": 1e400, "value": "NaN", "currencyCode": 5}',
    b'{"count": -1, "value": 10, "currencyCode": "USD"}',
    b'{"count": 100000000, "value": 10, "currencyCode": "USD"}',
    b'{"fromPosition": "yesterday"}',
    b'{"url": "ftp://example.com/hook", "events": "all"}',
    b'{"dup": 1, "dup": 2}',
]
BAD_QUERIES = [
    "since=yesterday",
    "until=2026-13-45",
    "since=2026-02-01&until=2026-01-01",
    "currency=%00",
    "operation=Refund",
    "card=..%2F..",
    "asOf=tomorrow",
    "provider=" + "p" * 5000,
    "orderId=%FF%FE",
]
GET_ROUTES = [
    "/api/ledger/balances",
    "/api/ledger/balances/{id}",
    "/api/ledger/transactions",
    "/api/ledger/daily-totals",
    "/api/projections",
    "/api/webhooks",
    "/api/webhooks/{id}",
    "/api/webhooks/{id}/dead-letters",
    "/api/audit/cards/{id}",
    "/audit",
    "/audit/cards/{id}",
]
POST_ROUTES = [
    "/api/webhooks",
    "/api/webhooks/{id}/replay",
    "/api/webhooks/{id}/dead-letters/retry",
    "/api/giftcards/_batches",
]
HEADERS = {"X-VTEX-API-AppKey": HUB_KEY, "X-VTEX-API-AppToken": HUB_TOKEN, "Content-Type": "application/json"}
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{HUB_KEY}:{HUB_TOKEN}".encode()).decode()}


async def written(pool) -> tuple[int, ...]:
    return tuple(
        [
            await pool.fetchval(f"select count(*) from {table}")
            for table in ("events", "card_lookup", "providers", "webhook_subscriptions")
        ]
    )


def check(status: int, body: bytes, content_type: str, request: str) -> None:
    assert status < 500, f"{request} -> {status} {body[:300]!r}"
    if status >= 400 and content_type.startswith("application/json"):
        error = json.loads(body)["error"]
        assert error["code"] and error["message"], request
    elif status >= 400:
        assert content_type.startswith(("text/html", "text/plain")) and body, f"{request}: an empty refusal"


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as session:
        yield session


async def send(session, service, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
    headers = {**HEADERS, **(BASIC if path.startswith("/audit") else {})}
    async with session.request(method, service.base_url + path, data=body, headers=headers) as response:
        return response.status, await response.read(), response.headers.get("Content-Type", "")


async def test_reads_with_garbage_ids_and_queries_never_5xx(service, pool, session):
    before = await written(pool)
    for route, card_id, query in product(GET_ROUTES, GARBAGE_IDS[:3], ["", *BAD_QUERIES]):
        path = route.replace("{id}", card_id) + (f"?{query}" if query else "")
        status, body, content_type = await send(session, service, "GET", path)
        check(status, body, content_type, f"GET {path}")
    assert await written(pool) == before, "reads never write"


async def test_writes_with_hostile_bodies_never_5xx_and_write_nothing(service, pool, session):
    before = await written(pool)
    for route, webhook_id, body in product(POST_ROUTES, GARBAGE_IDS, BAD_BODIES):
        path = route.replace("{id}", webhook_id)
        status, answer, content_type = await send(session, service, "POST", path, body)
        check(status, answer, content_type, f"POST {path} {body[:80]!r}")
        assert status >= 400, f"POST {path} {body[:80]!r} was accepted"
    for webhook_id in GARBAGE_IDS:
        status, answer, content_type = await send(session, service, "DELETE", f"/api/webhooks/{webhook_id}")
        check(status, answer, content_type, f"DELETE /api/webhooks/{webhook_id}")
    assert await written(pool) == before, "a refused request wrote something"
