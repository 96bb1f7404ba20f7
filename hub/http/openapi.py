"""Our own OpenAPI document (``GET /openapi.json``) and its viewer (``GET /docs``).

The document is built from the application's route table, so no route can be
served undocumented: a route without an entry in ``OPERATIONS`` fails the tests.
Request bodies are described by the very msgspec Structs that decode them.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from hub import wire
from hub.webhooks.wire import CreateWebhookRequest, ReplayWebhookRequest

SWAGGER_STATIC = "/docs/static"

# (method, path) -> (tag, summary, request Struct or None)
OPERATIONS: dict[tuple[str, str], tuple[str, str, type | None]] = {}


def _describe(tag: str, base: str, entries: list[tuple[str, str, str, type | None]]) -> None:
    for method, suffix, summary, body in entries:
        OPERATIONS[(method, base + suffix)] = (tag, summary, body)


_CARD_OPERATIONS = [
    ("POST", "/giftcards/_search", "Find usable cards by redemption code or by client (REST-Range)", wire.SearchRequest),
    ("POST", "/giftcards", "Create a gift card (the only answer that shows the full redemption code)", wire.CreateCardRequest),
    ("GET", "/giftcards/{card_id}", "Get a gift card and its balance", None),
    ("GET", "/giftcards/{card_id}/transactions", "List a card's transactions (ids)", None),
    ("POST", "/giftcards/{card_id}/transactions", "Create a Credit or Debit (authorization); idempotent by requestId", wire.CreateTransactionRequest),
    ("GET", "/giftcards/{card_id}/transactions/{transaction_id}", "Get a transaction", None),
    ("GET", "/giftcards/{card_id}/transactions/{transaction_id}/authorization", "Get a transaction's authorization", None),
    ("GET", "/giftcards/{card_id}/transactions/{transaction_id}/settlements", "List a transaction's settlements", None),
    ("POST", "/giftcards/{card_id}/transactions/{transaction_id}/settlements", "Settle (capture) part of what is held", wire.OperationRequest),
    ("GET", "/giftcards/{card_id}/transactions/{transaction_id}/cancellations", "List a transaction's cancellations", None),
    ("POST", "/giftcards/{card_id}/transactions/{transaction_id}/cancellations", "Cancel: release what is held, then refund", wire.OperationRequest),
]  # fmt: skip

# (method, path) -> what a 200 answers, where it is more than the summary says.
ANSWERS: dict[tuple[str, str], str] = {}

_CARD = (
    "The card: id, redemptionCode (in full, in this answer only) and redemptionToken, balance (0), relationName, "
    "caption, emissionDate, expiringDate, currencyCode, discount, transactions {href}"
)
_CARD_ANSWERS = {
    "/native": {
        ("POST", "/giftcards"): _CARD + "; and the request's echo: restrictedToOwner, multipleRedemptions, "
        "multipleCredits, profileId",
    },
    "/api": {("POST", "/giftcards"): _CARD},
    "/api/giftcardproviders/{provider_id}": {
        ("POST", "/giftcards"): _CARD + ", provider, _self; the native provider adds the request's echo, an external "
        "provider's answer is completed from its card",
        ("GET", "/giftcards/{card_id}/transactions"): "[{provider, cardId, id, _self}]",
        ("POST", "/giftcards/{card_id}/transactions"): "{provider, cardId, id, _self}",
    },
}
_TRANSACTION_ANSWER = (
    "value, operation, description, date, requestId, cardId, id, settlement/cancellation/authorization {href}, "
    "and orderInfo as it was sent with the transaction (absent when none was)"
)
for _base, _answers in _CARD_ANSWERS.items():
    _answers[("GET", "/giftcards/{card_id}/transactions/{transaction_id}")] = _TRANSACTION_ANSWER
    ANSWERS.update({(method, _base + suffix): answer for (method, suffix), answer in _answers.items()})
ANSWERS[("DELETE", "/api/giftcardproviders/{provider_id}")] = (
    "Removed. No body, as VTEX's Hub spec documents (an unknown provider is a 404 with a JSON error)"
)

_describe("Native Provider Protocol", "/native", _CARD_OPERATIONS)
_describe("Native Gift Card API", "/api", _CARD_OPERATIONS)
_describe(
    "Native Gift Card API",
    "/api",
    [
        (
            "POST",
            "/giftcards/_batches",
            "Extension: issue a batch of cards (resumable by batchId); the only answer that shows their codes",
            wire.CreateBatchRequest,
        )
    ],
)
_describe(
    "Gift Card Hub",
    "/api/giftcardproviders",
    [
        ("GET", "", "List providers, the native one first (REST-Range)", None),
        (
            "POST",
            "/_search",
            "Extension: _search on every provider at once, with each one's outcome",
            wire.SearchRequest,
        ),
        ("GET", "/{provider_id}", "Get a provider", None),
        ("PUT", "/{provider_id}", "Register or update an external provider (credentials encrypted at rest)", None),
        ("DELETE", "/{provider_id}", "Remove an external provider", None),
    ]
    + [(m, "/{provider_id}" + p, s, b) for m, p, s, b in _CARD_OPERATIONS],
)
_describe(
    "Ledger read models",
    "/api",
    [
        ("GET", "/ledger/balances", "Card balances (projection; REST-Range)", None),
        ("GET", "/ledger/balances/{card_id}", "One card's projected balance", None),
        ("GET", "/ledger/transactions", "Transaction history, filterable (projection; REST-Range)", None),
        ("GET", "/ledger/daily-totals", "Daily totals per currency and provider (projection)", None),
        ("GET", "/projections", "Each projection's position and lag", None),
    ],
)
_describe(
    "Webhooks",
    "/api/webhooks",
    [
        ("GET", "", "Webhook subscriptions, with position, lag, failures and dead letters", None),
        ("POST", "", "Subscribe a URL to ledger events; the only answer that shows the signing secret", CreateWebhookRequest),
        ("GET", "/{webhook_id}", "One webhook subscription", None),
        ("DELETE", "/{webhook_id}", "Remove a webhook subscription and its dead letters", None),
        ("GET", "/{webhook_id}/dead-letters", "Events given up on after the maximum attempts (REST-Range)", None),
        ("POST", "/{webhook_id}/dead-letters/retry", "One more delivery attempt at each dead letter", None),
        ("POST", "/{webhook_id}/replay", "Deliver again every event from a position on", ReplayWebhookRequest),
    ],
)  # fmt: skip
_describe(
    "Operations",
    "",
    [
        ("GET", "/healthz", "Alive", None),
        ("GET", "/readyz", "Ready: the primary answers; whether its commits are synchronously replicated", None),
        ("GET", "/metrics", "Prometheus metrics", None),
        ("GET", "/openapi.json", "This document", None),
        ("GET", "/docs", "This document, rendered", None),
    ],
)
_describe(
    "Auditor's view",
    "/audit",
    [
        ("GET", "", "HTML: ledger totals, liability per currency over time, the last audit verify's result", None),
        ("GET", "/cards", "HTML form target: redirects ?card=ID to that card's page", None),
        ("GET", "/cards/{card_id}", "HTML: a card's timeline, balance chart and state (?asOf= ISO 8601)", None),
        ("GET", "/rollforward", "HTML: the liability roll-forward of ?from=DAY&to=DAY per currency", None),
        ("GET", "/rollforward/movements", "HTML: the movements behind one roll-forward figure", None),
    ],
)

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "detail": {}},
        }
    },
}

_SECURITY = {
    "Native Provider Protocol": [{"providerKey": [], "providerToken": []}],
    "Native Gift Card API": [{"hubKey": [], "hubToken": []}],
    "Gift Card Hub": [{"hubKey": [], "hubToken": []}],
    "Webhooks": [{"hubKey": [], "hubToken": []}],
    "Auditor's view": [{"auditBasic": []}],
}


def describe(method: str, path: str) -> tuple[str, str, type | None] | None:
    return OPERATIONS.get((method, path))


def build_document(app: web.Application) -> dict[str, Any]:
    bodies = sorted({body for _, _, body in OPERATIONS.values() if body is not None}, key=lambda t: t.__name__)
    schemas, components = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    components["Error"] = _ERROR_SCHEMA
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        path = route_path(route)
        if route.method == "HEAD" or path.startswith(SWAGGER_STATIC):
            continue
        described = describe(route.method, path)
        tag, summary, body = described if described else ("Undocumented", "", None)
        operation: dict[str, Any] = {
            "tags": [tag],
            "summary": summary,
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in _path_parameters(path)
            ],
            "responses": {
                "200": {"description": ANSWERS.get((route.method, path), "Success (VTEX answers 200 everywhere)")},
                "4XX": {
                    "description": "Refused: the error names what was wrong (401/403 from the Provider Protocol have empty bodies)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
        }
        if body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schemas[bodies.index(body)]}},
            }
        if tag in _SECURITY:
            operation["security"] = _SECURITY[tag]
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Gift Card Hub",
            "version": "0.1.0",
            "description": "VTEX's gift card protocols (Hub API, Provider Protocol, native Gift Card API) over an "
            "event-sourced ledger, plus this project's extensions.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "hubKey": {"type": "apiKey", "in": "header", "name": "X-VTEX-API-AppKey"},
                "hubToken": {"type": "apiKey", "in": "header", "name": "X-VTEX-API-AppToken"},
                "providerKey": {"type": "apiKey", "in": "header", "name": "X-PROVIDER-API-AppKey"},
                "providerToken": {"type": "apiKey", "in": "header", "name": "X-PROVIDER-API-AppToken"},
                "auditBasic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "A hub-consumer key as user name and its token as password (view role)",
                },
            },
        },
    }


def route_path(route: web.AbstractRoute) -> str:
    info = route.resource.get_info() if route.resource is not None else {}
    return info.get("formatter") or info.get("path") or info.get("prefix") or ""


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(build_document(request.app))


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Gift Card Hub API</title>
<link rel="stylesheet" href="{static}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{static}/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script>
</body></html>"""


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=_DOCS_PAGE.format(static=SWAGGER_STATIC), content_type="text/html")


def add_routes(app: web.Application) -> None:
    from swagger_ui_bundle import swagger_ui_path  # the viewer ships in a wheel: no CDN needed

    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)
    app.router.add_static(SWAGGER_STATIC, swagger_ui_path)
