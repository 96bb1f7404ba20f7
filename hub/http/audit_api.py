"""Audit over HTTP: one card's history replayed, with its state at an instant (hub-consumer credentials).

``GET /api/audit/cards/{card_id}?asOf=ISO8601[&tenant=ACCOUNT]`` answers what ``giftcard audit card --json``
prints: every event of the card, replayed through the domain, with the balance after each,
the card's state as of the instant (effective time: the ledger's clock inside each event,
which the hash chain covers), and every failure of its hash chain or invariants. It reads the
card's own events, so it is strongly consistent, on the primary; with ``GIFTCARD_REPLICA_URL``
set it reads the replica and states that replica's lag (``hub.http.read_pool``). The card is looked
for in the key's tenant, or, for an operator's key, in the tenant ``?tenant=`` names or in every one
(``hub.http.accounts``). ``audit verify`` walks
the whole ledger and is a CLI command only: it is not bounded by a request's time.
"""

from __future__ import annotations

from aiohttp import web

from hub.http import openapi
from hub.http.answers import CardAudit
from hub.http.native import json_response
from hub.http.read_api import instant_param
from hub.http.read_pool import read_pool
from hub.http.state import SETTINGS
from ledger.eventstore.store import EventStore
from projections.audit.auditors import audit_card, render_card_audit

BASE = "/api/audit"

# Documented here, beside the route, so that wiring routes() in is the only edit app.py needs.
openapi.document(
    "GET",
    f"{BASE}/cards/{{card_id}}",
    openapi.Operation(
        "Audit",
        "A card's events replayed with the balance after each, its state as of asOf, and any failure",
        answer=CardAudit,
        query=(openapi.AS_OF, openapi.TENANT),
    ),
)


async def get_card_audit(request: web.Request) -> web.Response:
    as_of = instant_param(request, "asOf")
    audit = await audit_card(EventStore(await read_pool(request)), request.match_info["card_id"], as_of)
    return json_response(render_card_audit(audit, request.app[SETTINGS].native_provider_id))


def routes() -> list[web.RouteDef]:
    return [web.get(f"{BASE}/cards/{{card_id}}", get_card_audit)]
