"""The native provider on the wire: the same ledger behind two VTEX surfaces.

- ``/native``: the Gift Card Provider Protocol (11 operations), so that any
  VTEX-style hub, ours or VTEX's, can register this ledger as a provider;
- ``/api``: the native Gift Card API (11 operations), for store back offices.

The two differ only in the shapes of create, get and ``_search``; everything
about transactions, settlements and cancellations is shared. Every handler
hands its request to the native provider (``hub.providers.native``), which decodes it at the
edge, calls one ledger method and renders the result.
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from hub.http.accounts import link_base
from hub.http.auth import ACTOR
from hub.http.state import LEDGER, SETTINGS, THROTTLE
from hub.logs import REQUEST_ID
from hub.paging import parse_rest_range, unranged_means_whole
from hub.providers.native import Hrefs, NativeProvider, Surface
from hub.wire import encode

_JSON_MEDIA_SUFFIXES = ("/json", "+json")


# ---- answers and request plumbing ------------------------------------------------


def json_response(body: Any, headers: dict[str, str] | None = None) -> web.Response:
    response = web.Response(body=encode(body), content_type="application/json", headers=headers)
    response.headers["Cache-Control"] = "no-cache, no-store"
    return response


def is_json_media_type(media: str) -> bool:
    """``application/json`` or a vnd type such as ``application/vnd.vtex.giftcards.v1+json``:
    ``media`` is the bare type, lower case, without parameters."""
    return media.endswith(_JSON_MEDIA_SUFFIXES)


def media_type_of(content_type: str) -> str:
    """The bare media type of a Content-Type value (``application/json; charset=utf-8`` ->
    ``application/json``), lower case: what ``is_json_media_type`` takes."""
    return content_type.split(";", 1)[0].strip().lower()


async def read_body(request: web.Request) -> bytes:
    """The raw JSON body, after checking it claims to be JSON (``application/json`` or a vnd type).
    The header is read as it came: aiohttp's parsed ``content_type`` cost every request 5 µs."""
    content_type = request.headers.get("Content-Type")
    if content_type and not is_json_media_type(media_type_of(content_type)):
        raise web.HTTPUnsupportedMediaType(reason=f"Content-Type must be JSON, got {request.content_type!r}")
    return await request.read()


def event_metadata(request: web.Request) -> dict[str, Any]:
    return {"requestId": request.get(REQUEST_ID), "actor": request.get(ACTOR), "route": request.path}


# ---- handlers ----------------------------------------------------------------------


class NativeHandlers:
    """The 11 operations of one surface over HTTP; the Gift Card API differs only in create,
    get and ``_search``."""

    def __init__(self, surface: Surface, base: str) -> None:
        self.surface = surface
        self.base = base

    def provider(self, request: web.Request) -> NativeProvider:
        hrefs = Hrefs(link_base(request, self.base))
        return NativeProvider(request.app[LEDGER], request.app[SETTINGS], hrefs, request.app[THROTTLE], request[ACTOR])

    async def search(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        items, headers = await self.provider(request).search(body, request.headers.get("REST-Range"))
        if self.surface is Surface.PROTOCOL:
            return json_response(items, headers)
        window = parse_rest_range(request.headers.get("REST-Range"))
        total = int(headers["REST-Content-Range"].rsplit("/", 1)[1])
        paging = {
            "page": window.start // window.size + 1,
            "perPage": window.size,
            "total": total,
            "pages": math.ceil(total / window.size),
        }
        return json_response(
            {
                "items": [{"id": i["id"], "redemptionToken": i["redemptionToken"], "_self": i["_self"]} for i in items],
                "paging": paging,
            },
            headers,
        )

    async def create_card(self, request: web.Request) -> web.Response:
        provider = self.provider(request)
        body = await read_body(request)
        if self.surface is Surface.PROTOCOL:
            return json_response(await provider.create_card(body, event_metadata(request)))
        issued = await provider.issue(body, event_metadata(request), expiring_required=True)
        return json_response(provider.render_issued(issued))

    async def get_card(self, request: web.Request) -> web.Response:
        return json_response(await self.provider(request).get_card(request.match_info["card_id"]))

    async def list_transactions(self, request: web.Request) -> web.Response:
        parse_rest_range(request.headers.get("REST-Range"))  # a bad range is refused before the card is read
        refs = await self.provider(request).list_transactions(request.match_info["card_id"])
        return json_response(*unranged_means_whole(request.headers.get("REST-Range"), refs))

    async def create_transaction(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        card_id = request.match_info["card_id"]
        return json_response(await self.provider(request).create_transaction(card_id, body, event_metadata(request)))

    async def get_transaction(self, request: web.Request) -> web.Response:
        return json_response(await self.provider(request).get_transaction(*_ids(request)))

    async def get_authorization(self, request: web.Request) -> web.Response:
        return json_response(await self.provider(request).get_authorization(*_ids(request)))

    async def list_settlements(self, request: web.Request) -> web.Response:
        return json_response(await self.provider(request).list_settlements(*_ids(request)))

    async def list_cancellations(self, request: web.Request) -> web.Response:
        return json_response(await self.provider(request).list_cancellations(*_ids(request)))

    async def settle(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        return json_response(await self.provider(request).settle(*_ids(request), body, event_metadata(request)))

    async def cancel(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        return json_response(await self.provider(request).cancel(*_ids(request), body, event_metadata(request)))

    def routes(self) -> list[web.RouteDef]:
        return card_operation_routes(f"{self.base}/giftcards", self)


def card_operation_routes(cards: str, handlers: Any) -> list[web.RouteDef]:
    """The 11 gift card operations under ``cards``, served by ``handlers`` (one method per operation),
    the same table for /native, /api/giftcards and the hub's /api/giftcardproviders/{pid}/giftcards."""
    card = f"{cards}/{{card_id}}"
    transaction = f"{card}/transactions/{{transaction_id}}"
    return [
        web.post(f"{cards}/_search", handlers.search),
        web.post(cards, handlers.create_card),
        web.get(card, handlers.get_card),
        web.get(f"{card}/transactions", handlers.list_transactions),
        web.post(f"{card}/transactions", handlers.create_transaction),
        web.get(transaction, handlers.get_transaction),
        web.get(f"{transaction}/authorization", handlers.get_authorization),
        web.get(f"{transaction}/settlements", handlers.list_settlements),
        web.post(f"{transaction}/settlements", handlers.settle),
        web.get(f"{transaction}/cancellations", handlers.list_cancellations),
        web.post(f"{transaction}/cancellations", handlers.cancel),
    ]


def _ids(request: web.Request) -> tuple[str, str]:
    return request.match_info["card_id"], request.match_info["transaction_id"]
