"""Bulk issuance over HTTP: ``POST /api/giftcards/_batches`` (hub-consumer credentials, ``edit``).

``{"batchId"?, "count", "value", "currencyCode"?, "expiringDate"?, "caption"?, "profileId"?}``
issues the cards of the batch that do not exist yet, all in one transaction, and answers their
redemption codes: the answer is the only place they are ever shown. A retry with the same
``batchId`` issues only what is missing and says how many cards already existed (their codes
cannot be shown again). A batch larger than ``BATCH_CARDS_PER_REQUEST_MAX`` is the command
line's job (``giftcard cards issue``), which writes the codes to a file as it goes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from hub.http.accounts import link_base
from hub.http.native import event_metadata, json_response, read_body
from hub.http.state import LEDGER, SETTINGS
from hub.providers.native import Hrefs, default_expiry
from hub.wire import CreateBatchRequest, decode, format_datetime, parse_datetime
from ledger.application.bulk_issue import (
    BatchDefaults,
    BatchOutcome,
    BatchRequest,
    BulkIssuer,
    check_count,
    new_batch_id,
)
from ledger.domain.errors import InvalidRequest
from ledger.domain.money import to_major

ROUTE = "/api/giftcards/_batches"
# One request, one transaction, one answer holding every code (about 210 bytes a card): 10,000
# cards took 2.8 s and answered 2.1 MB on a loaded 2-core machine. Larger batches: the command line.
BATCH_CARDS_PER_REQUEST_MAX = 10_000


async def create_batch(request: web.Request) -> web.Response:
    body = decode(await read_body(request), CreateBatchRequest)
    if body.count > BATCH_CARDS_PER_REQUEST_MAX:
        raise InvalidRequest(
            f"count must be at most {BATCH_CARDS_PER_REQUEST_MAX} cards per request, got {body.count}: issue larger "
            "batches with `giftcard cards issue`, which writes their codes to a file as it goes"
        )
    check_count(body.count, BATCH_CARDS_PER_REQUEST_MAX)
    ledger, settings = request.app[LEDGER], request.app[SETTINGS]
    now = ledger.clock()
    batch = BatchRequest(
        batch_id=body.batch_id if body.batch_id is not None else new_batch_id(now),
        count=body.count,
        value=body.value,
        currency=body.currency_code,
        expiring_date=parse_datetime(body.expiring_date, "expiringDate") if body.expiring_date else None,
        caption=body.caption,
        profile_id=body.profile_id,
    )
    defaults = BatchDefaults(
        currency=settings.default_currency, expiring_date=default_expiry(now, settings.default_validity_days)
    )
    metadata = {**event_metadata(request), "batchId": batch.batch_id}
    outcome = await BulkIssuer(ledger).issue_in_one_transaction(batch, defaults, metadata=metadata)
    return json_response(render_outcome(outcome, Hrefs(link_base(request, "/api"))))


def render_outcome(outcome: BatchOutcome, hrefs: Hrefs) -> dict[str, Any]:
    terms = outcome.terms
    answer: dict[str, Any] = {
        "batchId": terms.batch_id,
        "count": terms.count,
        "issuedNow": outcome.issued_now,
        "alreadyIssued": outcome.already_issued,
        "value": to_major(terms.value, terms.currency),
        "currencyCode": terms.currency,
        "expiringDate": format_datetime(terms.expiring_date),
        "caption": terms.caption,
        "profileId": terms.profile_id,
        "cards": [
            {
                "n": card.n,
                "id": card.card_id,
                "relationName": card.relation_name,
                "redemptionCode": card.redemption_code,
                "_self": {"href": hrefs.card(card.card_id)},
            }
            for card in outcome.cards
        ],
    }
    if outcome.already_issued:
        answer["note"] = (
            f"{outcome.already_issued} card(s) of batch {terms.batch_id!r} already existed: their redemption "
            "codes were shown only in the answer that issued them and cannot be shown again"
        )
    return answer


def routes() -> list[web.RouteDef]:
    return [web.post(ROUTE, create_batch)]
