"""The VTEX Gift Card Hub API: a provider registry, and every gift card call routed to the
native ledger (in process) or to an external provider (over the Provider Protocol).

The hub validates what it is sent before forwarding it, adds ``provider`` to cards
and rewrites every link into its own ``/api/giftcardproviders/{pid}/...`` form.
Settlements and cancellations are posted only for what remains: the hub first
lists what the provider already recorded, as VTEX's hub does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web

from hub.errors import ApiError
from hub.http.accounts import link_base
from hub.http.auth import ACTOR
from hub.http.native import card_operation_routes, event_metadata, json_response, read_body
from hub.http.state import DIRECTORY, EGRESS, LEDGER, REGISTRY, SETTINGS, THROTTLE
from hub.paging import content_range, page_of, parse_rest_range, unranged_means_whole
from hub.providers.external import ExternalProvider
from hub.providers.native import Hrefs, NativeProvider
from hub.public_address import public_base_url
from hub.wire import CreateCardRequest, CreateTransactionRequest, OperationRequest, SearchRequest, decode, encode
from ledger.application.providers import Credentials, ProviderNotFound, RegisteredProvider
from ledger.domain import errors
from ledger.domain.errors import InvalidRequest
from ledger.domain.provider import ProviderSpec, check_provider_id, check_registration

log = logging.getLogger(__name__)

PROVIDERS = "/api/giftcardproviders"
CANCELLATIONS_DISABLED = "cancellations_disabled"

Port = NativeProvider | ExternalProvider


class ProviderPut(msgspec.Struct, rename="camel"):
    service_url: str
    oauth_provider: str = "vtex"
    pre_auth_enabled: bool = True
    cancel_enabled: bool = True
    id: str | None = None
    caption: str | None = None
    app_key: str | None = None
    app_token: str | None = None


def provider_href(request: web.Request, provider_id: str) -> str:
    """``/api/giftcardproviders/{id}``, behind the account of a tenant other than the default one."""
    return f"{link_base(request, PROVIDERS)}/{provider_id}"


def hub_hrefs(request: web.Request, provider_id: str) -> Hrefs:
    return Hrefs(provider_href(request, provider_id))


# ---- rendering -------------------------------------------------------------------------


def render_provider(request: web.Request, registered: RegisteredProvider) -> dict[str, Any]:
    """A provider as VTEX shows one: a registration without a caption has no ``caption`` key, as in
    VTEX's examples, rather than a ``null`` where clients expect a string."""
    spec = registered.spec
    caption = {} if spec.caption is None else {"caption": spec.caption}
    return {
        "id": spec.id,
        "serviceUrl": spec.service_url,
        "oauthProvider": spec.oauth_provider,
        **caption,
        "preAuthEnabled": spec.pre_auth_enabled,
        "cancelEnabled": spec.cancel_enabled,
        "_self": {"href": provider_href(request, spec.id)},
    }


def render_native_provider(request: web.Request) -> dict[str, Any]:
    native_id = request.app[SETTINGS].native_provider_id
    return {
        "id": native_id,
        "serviceUrl": _public_base_url(request) + link_base(request, "/native"),
        "oauthProvider": "vtex",
        "caption": "Gift card",
        "preAuthEnabled": True,
        "cancelEnabled": True,
        "_self": {"href": provider_href(request, native_id)},
    }


def link_card(request: web.Request, card: dict[str, Any], provider_id: str) -> dict[str, Any]:
    hrefs = hub_hrefs(request, provider_id)
    card_id = str(card.get("id", ""))
    link = {"href": hrefs.transactions(card_id)}
    return {
        **card,
        "provider": provider_id,
        "_self": {"href": hrefs.card(card_id)},
        "transaction": link,
        "transactions": link,
    }


def link_transaction_ref(request: web.Request, ref: dict[str, Any], provider_id: str, card_id: str) -> dict[str, Any]:
    """``{provider, cardId, id, _self}``: typed hub clients read ``provider`` on every transaction item."""
    href = hub_hrefs(request, provider_id).transaction(card_id, str(ref.get("id", "")))
    return {**ref, "provider": provider_id, "cardId": card_id, "_self": {"href": href}}


def link_transaction(
    request: web.Request, detail: dict[str, Any], provider_id: str, card_id: str, transaction_id: str
) -> dict[str, Any]:
    href = hub_hrefs(request, provider_id).transaction(card_id, transaction_id)
    return {
        **detail,
        "settlement": {"href": f"{href}/settlements"},
        "cancellation": {"href": f"{href}/cancellations"},
        "authorization": {"href": f"{href}/authorization"},
    }


# What a created card's answer holds besides the request's echo (VTEX's card shape, NOTES 3.3).
CARD_FIELDS = ("id", "redemptionToken", "redemptionCode", "balance", "emissionDate", "expiringDate", "currencyCode")


async def completed_card(port: ExternalProvider, created: dict[str, Any]) -> dict[str, Any]:
    """An external provider's create answer, completed from its card when it leaves fields out.

    The Provider Protocol's create only echoes the request and ``id``; the hub's callers expect the
    card (``balance``, ``redemptionToken``...). The card exists by now, so a failed read of it must
    not turn the create into an error: the echo is answered as it is.
    """
    if all(name in created for name in CARD_FIELDS) or not isinstance(created.get("id"), str):
        return created
    try:
        card = await port.get_card(created["id"])
    except ApiError as e:
        log.warning("card %s created at provider %s but not read back: %s", created["id"], port.id, e.message)
        return created
    return {**card, **created}  # the create's own answer wins: it may hold the one full redemption code


def total_of(operations: list[dict[str, Any]]) -> Decimal:
    return sum((Decimal(str(op.get("value", 0))) for op in operations), Decimal(0))


@dataclass(frozen=True)
class Verb:
    present: str
    past: str


SETTLE = Verb("settle", "settled")
CANCEL = Verb("cancel", "cancelled")


async def restated(
    refusal: errors.OverAmount | ApiError,
    verb: Verb,
    port: Port,
    card_id: str,
    transaction_id: str,
    wanted: Decimal,
    done: Decimal,
) -> Exception:
    """A refusal of the remainder the hub posted, restated in the caller's terms.

    The caller asked for a total (``wanted``); the hub posted only what was not yet done, so the
    provider's refusal names that remainder, an amount the caller never sent.
    """
    if isinstance(refusal, ApiError) and refusal.status >= 500:
        return refusal  # an outage, not a refusal of the amount: nothing to restate
    currency = refusal.currency if isinstance(refusal, errors.OverAmount) else await currency_of(port, card_id)
    unit = f" {currency}" if currency else ""
    asked = (
        f"cannot {verb.present} {wanted:f}{unit} in all on transaction {transaction_id}: "
        f"{done:f}{unit} {verb.past} already"
    )
    if isinstance(refusal, errors.OverAmount):
        return type(refusal)(
            f"{asked}, {refusal.left:f}{unit} left to {verb.present}", left=refusal.left, currency=refusal.currency
        )
    return ApiError(
        refusal.status,
        refusal.code,
        f"{refusal.message}: {asked}, the provider refused the remaining {wanted - done:f}{unit}",
        detail=refusal.detail,
        headers=refusal.headers,
    )


async def currency_of(port: Port, card_id: str) -> str | None:
    """The card's currency for a message, if the provider says; the refusal matters more than the unit."""
    try:
        card = await port.get_card(card_id)
    except (errors.DomainError, ApiError):
        return None
    currency = card.get("currencyCode")
    return currency if isinstance(currency, str) else None


# The ids a card operation forwards into a provider's URL, by the names VTEX's specs give them.
PATH_IDS = {"card_id": "giftCardId", "transaction_id": "transactionId"}
DOT_SEGMENTS = frozenset({".", ".."})


def check_path_ids(match_info: Mapping[str, str]) -> None:
    """Each id is one path segment of the provider's URL. ``..`` (sent as ``%2E%2E``) would be
    resolved away by the URL and ``/`` would add segments, either way calling another route of
    the provider with the hub's credentials: such ids are refused before anything is forwarded."""
    for key, name in PATH_IDS.items():
        value = match_info.get(key)
        if value is not None and (value in DOT_SEGMENTS or "/" in value):
            raise InvalidRequest(f"{name} {value!r} must be one path segment: not '.' or '..', and without '/'")


def check_positive_value(body: bytes) -> OperationRequest:
    request = decode(body, OperationRequest)
    if not request.value.is_finite() or request.value <= 0:
        raise InvalidRequest(f"value must be a positive number, got {request.value}")
    if not request.request_id.strip():
        raise InvalidRequest("requestId must be a non-empty string")
    return request


# ---- handlers ----------------------------------------------------------------------------


class HubHandlers:
    # ---- registry ----

    async def list_providers(self, request: web.Request) -> web.Response:
        window = parse_rest_range(request.headers.get("REST-Range"))
        directory = request.app[DIRECTORY]
        await directory.refresh()
        everything = [render_native_provider(request)] + [
            render_provider(request, r) for r in directory.registered.values()
        ]
        page = page_of(everything, window)
        return json_response(page, content_range(window, len(page), len(everything)))

    async def get_provider(self, request: web.Request) -> web.Response:
        provider_id = request.match_info["provider_id"]
        if provider_id == request.app[SETTINGS].native_provider_id:
            return json_response(render_native_provider(request))
        directory = request.app[DIRECTORY]
        await directory.refresh()
        registered = directory.registered.get(provider_id)
        if registered is None:
            raise ProviderNotFound(f"gift card provider {provider_id!r} not found")
        return json_response(render_provider(request, registered))

    async def put_provider(self, request: web.Request) -> web.Response:
        provider_id = request.match_info["provider_id"]
        check_provider_id(provider_id)
        body = decode(await read_body(request), ProviderPut)
        if body.id is not None and body.id != provider_id:
            raise InvalidRequest(f"id {body.id!r} in the body must equal the provider id {provider_id!r} in the path")
        spec = ProviderSpec(
            id=provider_id,
            service_url=body.service_url,
            oauth_provider=body.oauth_provider,
            caption=body.caption,
            pre_auth_enabled=body.pre_auth_enabled,
            cancel_enabled=body.cancel_enabled,
        )
        credentials = Credentials(body.app_key, body.app_token) if body.app_key and body.app_token else None
        check_registration(spec, request.app[SETTINGS].native_provider_id)
        if credentials is None:
            raise InvalidRequest("appKey and appToken are required for an external provider")
        await request.app[EGRESS].check_url(spec.service_url)
        registered = await request.app[REGISTRY].put(spec, credentials, metadata=event_metadata(request))
        await request.app[DIRECTORY].refresh()
        return json_response(render_provider(request, registered))

    async def delete_provider(self, request: web.Request) -> web.Response:
        await request.app[REGISTRY].remove(request.match_info["provider_id"], metadata=event_metadata(request))
        await request.app[DIRECTORY].refresh()
        # VTEX's Hub spec: "200 OK. This endpoint does not return any data in the response body."
        # No body, so no Content-Type either (RFC 9110, 8.3); an unknown provider is a 404 with a JSON error.
        return web.Response(status=200, headers={"Cache-Control": "no-cache, no-store"})

    # ---- routing ----

    def port(self, request: web.Request, provider_id: str) -> Port:
        settings = request.app[SETTINGS]
        if provider_id == settings.native_provider_id:
            return NativeProvider(
                request.app[LEDGER], settings, hub_hrefs(request, provider_id), request.app[THROTTLE], request[ACTOR]
            )
        external = request.app[DIRECTORY].external(provider_id)
        if external is None:
            raise ProviderNotFound(f"gift card provider {provider_id!r} not found")
        return external

    async def routed(self, request: web.Request) -> tuple[str, Port]:
        check_path_ids(request.match_info)
        provider_id = request.match_info["provider_id"]
        is_native = provider_id == request.app[SETTINGS].native_provider_id
        if not is_native and provider_id not in request.app[DIRECTORY].registered:
            await request.app[DIRECTORY].refresh()  # registered a moment ago through another process?
        return provider_id, self.port(request, provider_id)

    async def create_card(self, request: web.Request) -> web.Response:
        provider_id, port = await self.routed(request)
        body = await read_body(request)
        decode(body, CreateCardRequest)  # refuse what no provider could accept, before forwarding
        created = await port.create_card(body, event_metadata(request))
        if isinstance(port, ExternalProvider):
            created = await completed_card(port, created)
        card = link_card(request, created, provider_id)
        card.setdefault("discount", False)
        return json_response(card)

    async def search(self, request: web.Request) -> web.Response:
        provider_id, port = await self.routed(request)
        body = await read_body(request)
        decode(body, SearchRequest)
        items, headers = await port.search(body, request.headers.get("REST-Range"))
        return json_response([self._search_item(request, item, provider_id) for item in items], headers)

    async def search_everywhere(self, request: web.Request) -> web.Response:
        """Our extension: ``_search`` on every provider at once, merged, with each one's outcome."""
        body = await read_body(request)
        decode(body, SearchRequest)
        directory = request.app[DIRECTORY]
        await directory.refresh()
        provider_ids = [request.app[SETTINGS].native_provider_id, *directory.registered]
        outcomes = await asyncio.gather(*(self._search_one(request, pid, body) for pid in provider_ids))
        items = [item for found, _ in outcomes for item in found]
        return json_response({"items": items, "providers": [report for _, report in outcomes]})

    async def _search_one(self, request: web.Request, provider_id: str, body: bytes) -> tuple[list, dict[str, Any]]:
        started = time.monotonic()
        report: dict[str, Any] = {"id": provider_id}
        try:
            found, _ = await self.port(request, provider_id).search(body, request.headers.get("REST-Range"))
        except ApiError as e:
            status = {504: "timeout", 503: "unavailable"}.get(e.status, "failed")
            report.update(status=status, error={"code": e.code, "message": e.message}, count=0)
            found = []
        else:
            found = [self._search_item(request, item, provider_id) for item in found]
            report.update(status="ok", count=len(found))
        report["latencyMs"] = round((time.monotonic() - started) * 1000, 1)
        return found, report

    @staticmethod
    def _search_item(request: web.Request, item: dict[str, Any], provider_id: str) -> dict[str, Any]:
        href = hub_hrefs(request, provider_id).card(str(item.get("id")))
        return {**item, "provider": provider_id, "_self": {"href": href}}

    async def get_card(self, request: web.Request) -> web.Response:
        provider_id, port = await self.routed(request)
        card = await port.get_card(request.match_info["card_id"])
        return json_response(link_card(request, card, provider_id))

    async def list_transactions(self, request: web.Request) -> web.Response:
        """Paged by the hub: the Provider Protocol pages no transaction list, so the provider's
        whole list is fetched and the caller's ``REST-Range`` applied to it."""
        provider_id, port = await self.routed(request)
        parse_rest_range(request.headers.get("REST-Range"))  # a bad range is refused before anything is forwarded
        card_id = request.match_info["card_id"]
        refs = await port.list_transactions(card_id)
        page, headers = unranged_means_whole(request.headers.get("REST-Range"), refs)
        return json_response([link_transaction_ref(request, ref, provider_id, card_id) for ref in page], headers)

    async def create_transaction(self, request: web.Request) -> web.Response:
        provider_id, port = await self.routed(request)
        card_id = request.match_info["card_id"]
        body = await read_body(request)
        decode(body, CreateTransactionRequest)
        ref = await port.create_transaction(card_id, body, event_metadata(request))
        return json_response(link_transaction_ref(request, ref, provider_id, card_id))

    async def get_transaction(self, request: web.Request) -> web.Response:
        provider_id, port = await self.routed(request)
        card_id, transaction_id = request.match_info["card_id"], request.match_info["transaction_id"]
        detail = await port.get_transaction(card_id, transaction_id)
        return json_response(link_transaction(request, detail, provider_id, card_id, transaction_id))

    async def get_authorization(self, request: web.Request) -> web.Response:
        _, port = await self.routed(request)
        return json_response(
            await port.get_authorization(request.match_info["card_id"], request.match_info["transaction_id"])
        )

    async def list_settlements(self, request: web.Request) -> web.Response:
        _, port = await self.routed(request)
        return json_response(
            await port.list_settlements(request.match_info["card_id"], request.match_info["transaction_id"])
        )

    async def list_cancellations(self, request: web.Request) -> web.Response:
        _, port = await self.routed(request)
        return json_response(
            await port.list_cancellations(request.match_info["card_id"], request.match_info["transaction_id"])
        )

    async def settle(self, request: web.Request) -> web.Response:
        """Settles up to ``value`` in all: only the part not yet settled is posted. Answers the list."""
        _, port = await self.routed(request)
        card_id, transaction_id = request.match_info["card_id"], request.match_info["transaction_id"]
        wanted = check_positive_value(await read_body(request))
        settlements = await port.list_settlements(card_id, transaction_id)
        done = total_of(settlements)
        remainder = wanted.value - done
        if remainder > 0:
            body = encode({"value": remainder, "requestId": wanted.request_id})
            try:
                settled = await port.settle(card_id, transaction_id, body, event_metadata(request))
            except (errors.OverAmount, ApiError) as refusal:
                raise await restated(refusal, SETTLE, port, card_id, transaction_id, wanted.value, done) from None
            settlements = [*settlements, settled]
        return json_response(settlements)

    async def cancel(self, request: web.Request) -> web.Response:
        """Cancels up to ``value`` in all: only the part not yet cancelled is posted.

        Answers the new cancellation, or the latest one when nothing remained to cancel.
        """
        provider_id, port = await self.routed(request)
        if isinstance(port, ExternalProvider) and not port.registered.spec.cancel_enabled:
            raise ApiError(
                422, CANCELLATIONS_DISABLED, f"gift card provider {provider_id} does not allow cancellations"
            )
        card_id, transaction_id = request.match_info["card_id"], request.match_info["transaction_id"]
        wanted = check_positive_value(await read_body(request))
        cancellations = await port.list_cancellations(card_id, transaction_id)
        done = total_of(cancellations)
        remainder = wanted.value - done
        if remainder <= 0:
            return json_response(cancellations[-1])
        body = encode({"value": remainder, "requestId": wanted.request_id})
        try:
            return json_response(await port.cancel(card_id, transaction_id, body, event_metadata(request)))
        except (errors.OverAmount, ApiError) as refusal:
            raise await restated(refusal, CANCEL, port, card_id, transaction_id, wanted.value, done) from None

    def routes(self) -> list[web.RouteDef]:
        provider = f"{PROVIDERS}/{{provider_id}}"
        return [
            web.get(PROVIDERS, self.list_providers),
            web.post(f"{PROVIDERS}/_search", self.search_everywhere),
            web.get(provider, self.get_provider),
            web.put(provider, self.put_provider),
            web.delete(provider, self.delete_provider),
            *card_operation_routes(f"{provider}/giftcards", self),
        ]


def _public_base_url(request: web.Request) -> str:
    settings = request.app[SETTINGS]
    return public_base_url(request, settings.public_url, settings.trusted_proxies)
