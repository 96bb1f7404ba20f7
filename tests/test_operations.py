"""What operators see: the OpenAPI document, its viewer, metrics and logs."""

from __future__ import annotations

import aiohttp

from hub.http.openapi import build_document, describe, route_path


async def fetch(service, path: str) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as session, session.get(service.base_url + path) as response:
        return response.status, await response.read(), response.headers.get("Content-Type", "")


async def test_every_route_is_documented(service):
    missing = []
    for route in service.app.router.routes():
        path = route_path(route)
        if route.method == "HEAD" or path.startswith("/docs/static"):
            continue
        if describe(route.method, path) is None:
            missing.append((route.method, path))
    assert missing == []
    document = build_document(service.app)
    assert "/api/giftcardproviders/{provider_id}/giftcards/{card_id}/transactions" in document["paths"]
    assert document["paths"]["/native/giftcards"]["post"]["requestBody"]


async def test_openapi_json_and_docs_are_served(service):
    import json

    status, body, content_type = await fetch(service, "/openapi.json")
    document = json.loads(body)
    assert status == 200 and document["openapi"].startswith("3.") and len(document["paths"]) >= 30
    status, page, content_type = await fetch(service, "/docs")
    assert status == 200 and content_type.startswith("text/html") and b"/openapi.json" in page
    status, script, _ = await fetch(service, "/docs/static/swagger-ui-bundle.js")
    assert status == 200 and len(script) > 100_000


async def test_metrics_count_requests_and_appends(service, pool):
    status, card, _ = await service.call(
        "POST", "/native/giftcards", {"relationName": "m", "caption": "c", "profileId": "p"}
    )
    for _ in range(2):
        await service.call("GET", "/native/giftcards/not-a-card")
    status, body, content_type = await fetch(service, "/metrics")
    text = body.decode()
    assert status == 200 and content_type.startswith("text/plain")
    assert 'giftcard_http_requests_total{method="POST",route="/native/giftcards",status="200"} 1.0' in text
    assert 'giftcard_http_requests_total{method="GET",route="/native/giftcards/{card_id}",status="404"} 2.0' in text
    assert 'giftcard_http_request_seconds_count{method="GET",route="/native/giftcards/{card_id}"} 2.0' in text
    assert "giftcard_event_append_seconds_count 1.0" in text
    assert 'giftcard_projection_lag_events{projection="card_balances"}' in text
    lane = await pool.fetchval("select event_lane($1)", card["id"])  # the card's source
    assert f'giftcard_projection_source_lag_events{{projection="card_balances",source="{lane}"}}' in text
