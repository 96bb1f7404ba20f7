"""``/api/webhooks``: subscriptions, their dead letters and replays (hub-consumer credentials).

Reading needs the ``view`` role, every change ``edit`` (the auth middleware decides by method).
The signing secret is in the answer to the creation and in no other answer.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from hub.http.native import json_response, read_body
from hub.http.state import EGRESS, POOL, REGISTRY
from hub.paging import content_range, parse_rest_range
from hub.webhooks import storage
from hub.webhooks.subscriptions import create_subscription
from hub.webhooks.wire import CreateWebhookRequest, ReplayWebhookRequest
from hub.wire import decode, format_datetime

BASE = "/api/webhooks"


# ---- rendering (the CLI's --json prints the same) ----------------------------------------


def render_subscription(subscription: storage.Subscription) -> dict[str, Any]:
    return {
        "id": subscription.id,
        "url": subscription.url,
        "events": None if subscription.event_types is None else list(subscription.event_types),
        "description": subscription.description,
        "createdAt": _instant(subscription.created_at),
        "checkpoint": subscription.checkpoint.render(),
        "lagEvents": subscription.lag_events,
        "delivered": subscription.delivered,
        "lastDeliveredAt": _instant(subscription.last_delivered_at),
        "attempts": subscription.attempts,  # failures of the event it is blocked on (0: not blocked)
        "nextAttemptAt": _instant(subscription.next_attempt_at),
        "lastError": subscription.last_error,
        "deadLetters": subscription.dead_letters,
    }


def render_dead_letter(letter: storage.DeadLetter) -> dict[str, Any]:
    return {
        "subscriptionId": letter.subscription_id,
        "eventId": letter.position,
        "type": letter.event_type,
        "subjectId": letter.subject_id,
        "attempts": letter.attempts,
        "lastError": letter.last_error,
        "deadAt": _instant(letter.dead_at),
        "retryRequested": letter.retry_requested,
        "payload": msgspec.Raw(letter.body),  # exactly what was sent
    }


def _instant(value: Any) -> str | None:
    return None if value is None else format_datetime(value)


# ---- handlers ------------------------------------------------------------------------------


async def list_webhooks(request: web.Request) -> web.Response:
    found = await storage.list_subscriptions(request.app[POOL])
    return json_response({"items": [render_subscription(s) for s in found]})


async def create_webhook(request: web.Request) -> web.Response:
    body = decode(await read_body(request), CreateWebhookRequest)
    created = await create_subscription(
        request.app[POOL],
        request.app[REGISTRY].cipher,  # the one provider credentials use: same key, other context
        request.app[EGRESS],
        url=body.url,
        event_types=body.events,
        description=body.description,
    )
    return json_response({**render_subscription(created.subscription), "secret": created.secret})


async def get_webhook(request: web.Request) -> web.Response:
    return json_response(render_subscription(await storage.get(request.app[POOL], request.match_info["webhook_id"])))


async def delete_webhook(request: web.Request) -> web.Response:
    subscription_id = request.match_info["webhook_id"]
    await storage.remove(request.app[POOL], subscription_id)
    return json_response({"id": subscription_id, "removed": True})


async def list_dead_letters(request: web.Request) -> web.Response:
    window = parse_rest_range(request.headers.get("REST-Range"))
    subscription = await storage.get(request.app[POOL], request.match_info["webhook_id"])  # 404 when unknown
    letters, total = await storage.dead_letters(request.app[POOL], subscription.id, window.start, window.size)
    items = [render_dead_letter(letter) for letter in letters]
    return json_response({"items": items}, content_range(window, len(items), total))


async def retry_dead_letters(request: web.Request) -> web.Response:
    subscription = await storage.get(request.app[POOL], request.match_info["webhook_id"])
    marked = await storage.request_retry(request.app[POOL], subscription.id)
    return json_response({"id": subscription.id, "retryRequested": marked})


async def replay_webhook(request: web.Request) -> web.Response:
    body = decode(await read_body(request), ReplayWebhookRequest)
    subscription = await storage.replay(request.app[POOL], request.match_info["webhook_id"], body.from_position)
    return json_response(render_subscription(subscription))


def routes() -> list[web.RouteDef]:
    return [
        web.get(BASE, list_webhooks),
        web.post(BASE, create_webhook),
        web.get(f"{BASE}/{{webhook_id}}", get_webhook),
        web.delete(f"{BASE}/{{webhook_id}}", delete_webhook),
        web.get(f"{BASE}/{{webhook_id}}/dead-letters", list_dead_letters),
        web.post(f"{BASE}/{{webhook_id}}/dead-letters/retry", retry_dead_letters),
        web.post(f"{BASE}/{{webhook_id}}/replay", replay_webhook),
    ]
