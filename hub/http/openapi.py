"""Our own OpenAPI document (``GET /openapi.json``) and its viewer (``GET /docs``).

The document is built from the application's route table, so no route can be served
undocumented: a route without an entry in ``OPERATIONS`` fails the tests. Request bodies are
described by the very msgspec Structs that decode them, answers by the Structs of
``hub.http.answers``; tests check real answers against both.

It is OpenAPI 3.0.3, not 3.1: the Swagger UI that ``/docs`` serves (swagger-ui-bundle's 3.x)
renders 3.0 only, and most client generators still read 3.0 best. msgspec writes JSON Schema
2020-12, so :func:`schema_30` turns it into 3.0's dialect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from hub import paging, wire
from hub.http import answers, auth, read_api
from hub.http.accounts import ACCOUNT_PARAMETER
from hub.http.hub_api import ProviderPut
from hub.webhooks.wire import CreateWebhookRequest, ReplayWebhookRequest
from ledger.domain.giftcard import OPERATIONS as TRANSACTION_OPERATIONS
from projections.models.card_balances import STATUSES as CARD_STATUSES

SWAGGER_STATIC = "/docs/static"
OPENAPI_VERSION = "3.0.3"

JSON = "application/json"
HTML = "text/html"
TEXT = "text/plain"


class Query(NamedTuple):
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class Operation:
    """One route as the document shows it. ``answer``: the type a success answers as JSON (a Struct
    or a list of one), a media type for other answers, or None for no body at all."""

    tag: str
    summary: str
    body: type | None = None  # the Struct the handler decodes
    answer: Any = None
    note: str = ""  # what the answer means, beyond its schema
    query: tuple[Query, ...] = ()
    paged: bool = False  # reads REST-Range, answers REST-Content-Range
    page_answered: bool = True  # False: REST-Range is passed on to each provider, no range is answered
    success: int = 200


# (method, path) -> how the document shows it
OPERATIONS: dict[tuple[str, str], Operation] = {}


def document(method: str, path: str, operation: Operation) -> None:
    """Modules that add routes of their own document them here, beside the routes."""
    OPERATIONS[(method, path)] = operation


def describe(method: str, path: str) -> Operation | None:
    """A route under ``/{account}`` (hub.http.accounts) is the same operation as the one without it."""
    return OPERATIONS.get((method, path)) or OPERATIONS.get((method, _without_account(path)))


def _without_account(path: str) -> str:
    return path.removeprefix(ACCOUNT_PARAMETER)


# ---- query parameters, as the handlers read them -----------------------------------------

_TEXT = {"type": "string", "minLength": 1, "maxLength": read_api.QUERY_TEXT_CHARS_MAX}
_INSTANT = {"type": "string", "format": "date-time"}
_DAY = {"type": "string", "format": "date"}
CURRENCY = Query("currency", {"type": "string", "example": "BRL"}, "ISO 4217 code; an unknown one is a 400")
PROVIDER = Query("provider", _TEXT, "Provider id")
AS_OF = Query("asOf", _INSTANT, "The state as of this instant (ISO 8601; naive means UTC)")
FROM_DAY = Query("from", {"type": "string", "format": "date"}, "The period's first UTC day (YYYY-MM-DD)")
TO_DAY = Query("to", {"type": "string", "format": "date"}, "The period's last UTC day, included (YYYY-MM-DD)")
CACHE_BUSTER = Query("ts", {"type": "string"}, "VTEX's cache buster: accepted and ignored")
ACCOUNT = Query(
    "an",
    {"type": "string"},
    "VTEX's account name, as VTEX's own hub client sends it: ignored, unless GIFTCARD_ACCOUNT_QUERY is set;"
    " then it must be the key's tenant (403 tenant_mismatch)",
)
TENANT = Query(
    "tenant",
    {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"},
    "The tenant (VTEX account) to read: a tenant's key may name only its own; an operator's any one,"
    " and without it reads every tenant",
)


# ---- the 11 gift card operations, on three surfaces -----------------------------------------


@dataclass(frozen=True)
class CardAnswers:
    """Where the three surfaces differ: what create, get, list, _search and settle answer."""

    card: type
    created: type
    transaction_ref: type
    search: Any
    settle: Any


def _card_operations(tag: str, shapes: CardAnswers) -> list[tuple[str, str, Operation]]:
    card = "/giftcards/{card_id}"
    transaction = card + "/transactions/{transaction_id}"
    return [
        ("POST", "/giftcards/_search", Operation(tag, "Find usable cards by redemption code or by client", wire.SearchRequest, shapes.search, paged=True)),
        ("POST", "/giftcards", Operation(tag, "Create a gift card (the only answer that shows the full redemption code)", wire.CreateCardRequest, shapes.created)),
        ("GET", card, Operation(tag, "Get a gift card and its balance", answer=shapes.card)),
        ("GET", card + "/transactions", Operation(tag, "List a card's transactions (ids; whole without REST-Range)", answer=list[shapes.transaction_ref], paged=True)),
        ("POST", card + "/transactions", Operation(tag, "Create a Credit or Debit (authorization); idempotent by requestId; a redemptionCode or redemptionToken sent must be the card's", wire.CreateTransactionRequest, shapes.transaction_ref)),
        ("GET", transaction, Operation(tag, "Get a transaction", answer=answers.Transaction)),
        ("GET", transaction + "/authorization", Operation(tag, "Get a transaction's authorization", answer=answers.OperationRecord)),
        ("GET", transaction + "/settlements", Operation(tag, "List a transaction's settlements", answer=list[answers.OperationRecord])),
        ("POST", transaction + "/settlements", Operation(tag, "Settle (capture) part of what is held", wire.OperationRequest, shapes.settle)),
        ("GET", transaction + "/cancellations", Operation(tag, "List a transaction's cancellations", answer=list[answers.OperationRecord])),
        ("POST", transaction + "/cancellations", Operation(tag, "Cancel: release what is held, then refund", wire.OperationRequest, answers.OperationRecord)),
    ]  # fmt: skip


def _document_all(base: str, entries: list[tuple[str, str, Operation]]) -> None:
    for method, suffix, operation in entries:
        document(method, base + suffix, operation)


_document_all(
    "/native",
    _card_operations(
        "Native Provider Protocol",
        CardAnswers(answers.Card, answers.CreatedCard, answers.TransactionRef, list[answers.SearchItem], answers.OperationRecord),
    ),
)  # fmt: skip
_document_all(
    "/api",
    _card_operations(
        "Native Gift Card API",
        CardAnswers(answers.Card, answers.Card, answers.TransactionRef, answers.SearchPage, answers.OperationRecord),
    ),
)
document(
    "POST",
    "/api/giftcards/_batches",
    Operation(
        "Native Gift Card API",
        "Extension: issue a batch of cards (resumable by batchId); the only answer that shows their codes",
        wire.CreateBatchRequest,
        answers.Batch,
    ),
)
_HUB = "Gift Card Hub"
_document_all(
    "/api/giftcardproviders",
    [
        ("GET", "", Operation(_HUB, "List providers, the native one first", answer=list[answers.Provider], paged=True)),
        ("POST", "/_search", Operation(_HUB, "Extension: _search on every provider at once, with each one's outcome", wire.SearchRequest, answers.SearchEverywhere, paged=True, page_answered=False)),
        ("GET", "/{provider_id}", Operation(_HUB, "Get a provider", answer=answers.Provider)),
        ("PUT", "/{provider_id}", Operation(_HUB, "Register or update an external provider (credentials encrypted at rest)", ProviderPut, answers.Provider)),
        ("DELETE", "/{provider_id}", Operation(_HUB, "Remove an external provider", note="Removed. No body, as VTEX's Hub spec documents (an unknown provider is a 404 with a JSON error)")),
    ]
    + [
        (method, "/{provider_id}" + suffix, operation)
        for method, suffix, operation in _card_operations(
            _HUB,
            CardAnswers(answers.HubCard, answers.HubCreatedCard, answers.HubTransactionRef, list[answers.SearchItem], list[answers.OperationRecord]),
        )
    ],
)  # fmt: skip
_READ = "Ledger read models"
_document_all(
    "/api",
    [
        ("GET", "/ledger/balances", Operation(_READ, "Card balances (projection)", answer=answers.BalancePage, paged=True, query=(
            CURRENCY, Query("status", {"type": "string", "enum": list(CARD_STATUSES)}, "The card's state now")))),
        ("GET", "/ledger/balances/{card_id}", Operation(_READ, "One card's projected balance", answer=answers.OneBalance)),
        ("GET", "/ledger/transactions", Operation(_READ, "Transaction history, filterable (projection)", answer=answers.TransactionPage, paged=True, query=(
            Query("card", _TEXT, "Card id"),
            PROVIDER,
            Query("operation", {"type": "string", "enum": list(TRANSACTION_OPERATIONS)}, "Credit or Debit"),
            Query("orderId", _TEXT, "The orderId of the transaction's orderInfo"),
            Query("since", _INSTANT, "Transactions dated at or after this instant (ISO 8601)"),
            Query("until", _INSTANT, "Transactions dated before this instant (ISO 8601; not before since)"),
        ))),
        ("GET", "/ledger/daily-totals", Operation(_READ, "Daily totals per currency and provider (projection)", answer=answers.DailyTotalsPage, paged=True, query=(
            CURRENCY,
            PROVIDER,
            Query("since", _DAY, "First day (2026-01-31)"),
            Query("until", _DAY, "Last day (not before since)"),
        ))),
        ("GET", "/projections", Operation(_READ, "Each projection's position and lag", answer=answers.Projections)),
    ],
)  # fmt: skip
_WEBHOOKS = "Webhooks"
_document_all(
    "/api/webhooks",
    [
        ("GET", "", Operation(_WEBHOOKS, "Webhook subscriptions, with position, lag, failures and dead letters", answer=answers.Subscriptions)),
        ("POST", "", Operation(_WEBHOOKS, "Subscribe a URL to ledger events; the only answer that shows the signing secret", CreateWebhookRequest, answers.CreatedSubscription)),
        ("GET", "/{webhook_id}", Operation(_WEBHOOKS, "One webhook subscription", answer=answers.Subscription)),
        ("DELETE", "/{webhook_id}", Operation(_WEBHOOKS, "Remove a webhook subscription and its dead letters", answer=answers.RemovedSubscription)),
        ("GET", "/{webhook_id}/dead-letters", Operation(_WEBHOOKS, "Events given up on after the maximum attempts", answer=answers.DeadLetters, paged=True)),
        ("POST", "/{webhook_id}/dead-letters/retry", Operation(_WEBHOOKS, "One more delivery attempt at each dead letter", answer=answers.RetryRequested)),
        ("POST", "/{webhook_id}/replay", Operation(_WEBHOOKS, "Deliver again every event from a position on", ReplayWebhookRequest, answers.Subscription)),
    ],
)  # fmt: skip
_OPERATIONS = "Operations"
_document_all(
    "",
    [
        ("GET", "/healthz", Operation(_OPERATIONS, "Alive", answer=answers.Alive)),
        ("GET", "/readyz", Operation(_OPERATIONS, "Ready: the primary answers; whether its commits are synchronously replicated", answer=answers.Ready)),
        ("GET", "/metrics", Operation(_OPERATIONS, "Prometheus metrics", answer=TEXT)),
        ("GET", "/openapi.json", Operation(_OPERATIONS, "This document", answer=dict[str, Any])),
        ("GET", "/docs", Operation(_OPERATIONS, "This document, rendered", answer=HTML)),
    ],
)  # fmt: skip
_AUDITOR = "Auditor's view"
_document_all(
    "/audit",
    [
        ("GET", "", Operation(_AUDITOR, "HTML: ledger totals, liability per currency over time, the last audit verify's result", answer=HTML, query=(TENANT,))),
        ("GET", "/cards", Operation(_AUDITOR, "HTML form target: redirects ?card=ID to that card's page", answer=None, success=303, query=(
            Query("card", {"type": "string", "minLength": 1}, "The card id to open"),), note="See Other: Location is the card's page")),
        ("GET", "/cards/{card_id}", Operation(_AUDITOR, "HTML: a card's timeline, balance chart and state", answer=HTML, query=(AS_OF, TENANT))),
        ("GET", "/rollforward", Operation(_AUDITOR, "HTML: the liability roll-forward of a period, per currency, each figure linked to its movements", answer=HTML, query=(FROM_DAY, TO_DAY, TENANT))),
        ("GET", "/rollforward/movements", Operation(_AUDITOR, "HTML: the movements behind one roll-forward figure", answer=HTML, query=(
            FROM_DAY, TO_DAY, CURRENCY, Query("movement", _TEXT, "The movement: loaded, redeemed, expired_to_breakage, ..."), TENANT))),
    ],
)  # fmt: skip


# ---- refusals --------------------------------------------------------------------------------

_REFUSALS = {
    400: "Malformed or invalid input: the error names what was wrong, and nothing was written",
    401: "No credentials: an empty body",
    403: "Credentials not accepted (an empty body), or a key without the role this needs or naming another tenant"
    " (the error names it)",
    404: "No such card, transaction, provider or subscription",
    409: "A requestId reused with another payload, or a name already taken",
    413: "The body is over the limit",
    415: "The body is not JSON",
    422: "A rule refused it (insufficient_funds, card_expired, over_settlement, ...)",
    429: "Past the store's limit (tenant_rate_limited, tenant_concurrency_limited) or the code lookups' "
    "(too_many_failed_lookups): retry after Retry-After",
    502: "The external provider failed or answered something unusable",
    503: "The ledger database is unavailable, or was busy with a conflicting write: retry after Retry-After",
    504: "The external provider did not answer in time",
}
_AUDIT_PAGE_REFUSALS = {
    400: (HTML, "No card id given"),
    401: (TEXT, "Sign in (HTTP Basic: a hub-consumer key and its token)"),
    403: (TEXT, "These credentials lack the view role or are wrong"),
    404: (HTML, "No such card"),
}
_WRITES = ("POST", "PUT", "DELETE")


def refusal_statuses(method: str, path: str, operation: Operation) -> list[int]:
    """What a refused call answers, by what the route takes: the error middleware maps every failure."""
    if auth.audience_of(_without_account(path)) is None:
        return [503] if path == "/readyz" else []
    statuses = [400, 401, 403, 429, 503]  # 429: every keyed request counts against its store's limits
    if _path_parameters(path):
        statuses.append(404)
    if method in _WRITES and not path.endswith("/_search"):
        statuses += [409, 422]
    if operation.body is not None:
        statuses += [413, 415]
    if _without_account(path).startswith(
        "/api/giftcardproviders/{provider_id}/"
    ):  # routed to the provider, maybe an external one
        statuses += [502, 504]
    return sorted(statuses)


def _refusals(method: str, path: str, operation: Operation) -> dict[str, Any]:
    if auth.is_audit_page(path):
        shown = [400] * bool(operation.query) + [401, 403] + [404] * bool(_path_parameters(path))
        return {str(s): _media_response(_AUDIT_PAGE_REFUSALS[s][1], _AUDIT_PAGE_REFUSALS[s][0]) for s in shown}
    responses: dict[str, Any] = {}
    for status in refusal_statuses(method, path, operation):
        responses[str(status)] = {"description": _REFUSALS[status]}
        if status != 401:
            responses[str(status)]["content"] = {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}
        if status in (429, 503):
            responses[str(status)]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return responses


# ---- the document ------------------------------------------------------------------------------

_REST_RANGE = {
    "name": "REST-Range",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "example": "resources=0-49"},
    "description": f"The items wanted, first-last, 0-based and inclusive (`resources=0-49` or `0-49`); "
    f"{paging.PAGE_ITEMS_DEFAULT} from the first when absent, {paging.PAGE_ITEMS_MAX} at most",
}
_REST_CONTENT_RANGE = {
    "description": "The items answered and how many there are: `resources 0-49/1234`",
    "schema": {"type": "string"},
}

_SECURITY_SCHEMES = {
    "hubKey": {"type": "apiKey", "in": "header", "name": "X-VTEX-API-AppKey"},
    "hubToken": {"type": "apiKey", "in": "header", "name": "X-VTEX-API-AppToken"},
    "providerKey": {"type": "apiKey", "in": "header", "name": "X-PROVIDER-API-AppKey"},
    "providerToken": {"type": "apiKey", "in": "header", "name": "X-PROVIDER-API-AppToken"},
    "auditBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "A hub-consumer key as user name and its token as password (view role)",
    },
}


def security(path: str) -> list[dict[str, list]] | None:
    """The credentials the auth middleware asks of this path (None: it asks none)."""
    if auth.is_audit_page(path):
        return [{"auditBasic": []}]
    audience = auth.audience_of(_without_account(path))
    if audience == auth.PROVIDER:
        return [{"providerKey": [], "providerToken": []}]
    if audience == auth.HUB:
        return [{"hubKey": [], "hubToken": []}]
    return None


def documented_routes(app: web.Application) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, but the HEADs aiohttp adds and the viewer's static files."""
    return [
        (route.method, route_path(route))
        for route in app.router.routes()
        if route.method != "HEAD" and not route_path(route).startswith(SWAGGER_STATIC)
    ]


def build_document(app: web.Application) -> dict[str, Any]:
    routes = documented_routes(app)
    operations = {key: describe(*key) or Operation("Undocumented", "") for key in routes}
    types = _json_types(operations.values())
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schema_of = {type_: schema_30(schema) for type_, schema in zip(types, schemas, strict=True)}
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), operation in operations.items():
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, operation, schema_of)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Gift Card Hub",
            "version": "0.1.0",
            "description": "VTEX's gift card protocols (Hub API, Provider Protocol, native Gift Card API) over an "
            "event-sourced ledger, plus this project's extensions. Amounts are JSON numbers in major units.",
        },
        "paths": paths,
        "components": {
            "schemas": {name: schema_30(schema) for name, schema in sorted(components.items())},
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }


def _json_types(operations: Any) -> list[Any]:
    found = {answers.Error}
    for operation in operations:
        found.update(t for t in (operation.body, operation.answer) if t is not None and not isinstance(t, str))
    return sorted(found, key=repr)  # the same document on every build


def _operation(method: str, path: str, operation: Operation, schema_of: dict[Any, dict]) -> dict[str, Any]:
    built: dict[str, Any] = {
        "tags": [operation.tag],
        "summary": operation.summary,
        "operationId": method.lower() + "".join(f"_{part.strip('{}')}" for part in path.split("/") if part),
        "parameters": _parameters(method, path, operation),
        "responses": {str(operation.success): _success(operation, schema_of), **_refusals(method, path, operation)},
    }
    if operation.body is not None:
        built["requestBody"] = {"required": True, "content": {JSON: {"schema": schema_of[operation.body]}}}
    credentials = security(path)
    if credentials is not None:
        built["security"] = credentials
    return built


def _parameters(method: str, path: str, operation: Operation) -> list[dict[str, Any]]:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in _path_parameters(path)
    ]
    if operation.paged:
        parameters.append(_REST_RANGE)
    parameters += [
        {"name": q.name, "in": "query", "required": False, "schema": q.schema, "description": q.description}
        for q in (*operation.query, *_vtex_query(method, path))
    ]
    return parameters


def _vtex_query(method: str, path: str) -> tuple[Query, ...]:
    """What VTEX appends to its calls: ``?ts=`` to GETs of a provider, ``?an=`` to its own APIs."""
    path = _without_account(path)
    vtex_surface = path.startswith(("/native/", "/api/giftcards", "/api/giftcardproviders"))
    if not vtex_surface:
        return ()
    return ((CACHE_BUSTER,) if method == "GET" else ()) + (() if path.startswith("/native/") else (ACCOUNT,))


def _success(operation: Operation, schema_of: dict[Any, dict]) -> dict[str, Any]:
    description = operation.note or "Success (VTEX answers 200 everywhere)"
    if operation.answer is None:
        return {"description": description}
    if isinstance(operation.answer, str):
        return _media_response(description, operation.answer)
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema_of[operation.answer]}}}
    if operation.paged and operation.page_answered:
        response["headers"] = {"REST-Content-Range": _REST_CONTENT_RANGE}
    return response


def _media_response(description: str, media_type: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


# ---- JSON Schema 2020-12 (msgspec) -> OpenAPI 3.0's schema dialect ------------------------------

_NULL = {"type": "null"}
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
_SCHEMA_VALUES = ("items", "additionalProperties", "not")


def schema_30(schema: dict[str, Any]) -> dict[str, Any]:
    """msgspec's schema as OpenAPI 3.0 reads it: ``X | None`` is X with ``nullable``, Decimals are numbers,
    no empty ``required``."""
    converted: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            converted[key] = {name: schema_30(child) for name, child in value.items()}
        elif key in _SCHEMA_LISTS:
            converted[key] = [schema_30(child) for child in value]
        elif key in _SCHEMA_VALUES and isinstance(value, dict):
            converted[key] = schema_30(value)
        elif key == "required" and not value:
            continue  # 3.0 wants a non-empty list or none
        else:
            converted[key] = value
    return _nullable(_decimal_as_number(converted))


def _decimal_as_number(schema: dict[str, Any]) -> dict[str, Any]:
    # msgspec describes Decimal by its default text form; ours are written as JSON numbers
    # (hub.wire's encoder), and VTEX sends numbers.
    if schema.get("type") == "string" and schema.get("format") == "decimal":
        return {**{k: v for k, v in schema.items() if k != "format"}, "type": "number"}
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """3.0 has no ``null`` type: ``anyOf [X, null]`` becomes X with ``nullable: true``."""
    options = schema.get("anyOf")
    if options and _NULL in options:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        kept = [option for option in options if option != _NULL]
        if len(kept) > 1:
            return {**rest, "anyOf": kept, "nullable": True}
        # 3.0 ignores the siblings of a $ref, so a nullable reference wraps it in allOf.
        only = {"allOf": kept} if "$ref" in kept[0] else kept[0]
        return {**rest, **only, "nullable": True}
    if "default" in schema and schema["default"] is None:  # untyped (Any) with a null default
        return {**schema, "nullable": True}
    return schema


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
