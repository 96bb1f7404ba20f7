"""Listings for finance and audit, served from the read models (hub-consumer credentials).

The read models are eventually consistent: every answer carries ``freshness``, the
checkpoint of the projection it was read from and how far behind the events it is. With
``GIFTCARD_REPLICA_URL`` set they are read from that replica (``hub.http.read_pool``), and
``freshness.replica`` states its lag behind the primary as well.
Amounts are exact decimals in major units of their currency (``currency`` null: an external
provider's amount, whose currency the hub does not record). Listings page with ``REST-Range``
and answer ``REST-Content-Range``; filters are query parameters, and a bad one is a 400.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp import web

from hub.errors import ApiError
from hub.http.native import json_response
from hub.http.read_pool import read_pool, with_replica_lag
from hub.http.state import SETTINGS
from hub.paging import RestRange, content_range, parse_rest_range
from hub.wire import format_datetime, parse_datetime
from ledger.domain.errors import CardNotFound, InvalidRequest
from ledger.domain.giftcard import OPERATIONS
from ledger.domain.money import exponent_of, to_major
from projections import checkpoints
from projections.checkpoints import ProjectionStatus
from projections.events import UNKNOWN_CURRENCY_EXPONENT
from projections.models import card_balances, daily_totals, transaction_history

BASE = "/api/ledger"
QUERY_TEXT_CHARS_MAX = 256


# ---- query parameters --------------------------------------------------------------------


def text_param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is None:
        return None
    if not value.strip() or len(value) > QUERY_TEXT_CHARS_MAX:
        raise InvalidRequest(f"{name} must be a non-empty text of at most {QUERY_TEXT_CHARS_MAX} characters")
    return value


def choice_param(request: web.Request, name: str, choices: tuple[str, ...]) -> str | None:
    value = request.query.get(name)
    if value is not None and value not in choices:
        raise InvalidRequest(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def currency_param(request: web.Request) -> str | None:
    value = request.query.get("currency")
    if value is not None:
        exponent_of(value)  # an unknown code is a 400 naming it
    return value


def instant_param(request: web.Request, name: str) -> datetime | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return parse_datetime(value, name).astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 is before the first instant datetime holds
        raise InvalidRequest(f"{name} is outside the range of dates this service handles: {value!r}") from None


def day_param(request: web.Request, name: str) -> date | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date like 2026-01-31, got {value!r}") from None


def check_order(since: Any, until: Any) -> None:
    if since is not None and until is not None and until < since:
        raise InvalidRequest("until must not be before since")


# ---- rendering -----------------------------------------------------------------------------


def amount(minor: int | None, currency: str | None) -> Decimal | None:
    """Minor units as an exact major-unit decimal; an unknown currency's are 10^-4 units."""
    if minor is None:
        return None
    if currency is not None:
        return to_major(minor, currency)
    exact = Decimal(minor).scaleb(-UNKNOWN_CURRENCY_EXPONENT)
    return exact.quantize(Decimal(1)) if exact == exact.to_integral_value() else exact.normalize()


def render_freshness(status: ProjectionStatus) -> dict[str, Any]:
    return {
        "projection": status.name,
        "checkpoint": status.checkpoint.render(),
        "lastEventAt": None if status.last_event_at is None else format_datetime(status.last_event_at),
        "updatedAt": format_datetime(status.updated_at),
        "lagEvents": status.lag_events,
        "lagEventsBySource": {str(source): lag for source, lag in status.lag_by_source.items()},
        "lagSeconds": round(status.lag_s, 3),
        "rebuilding": status.rebuilding,
    }


def render_status(status: ProjectionStatus) -> dict[str, Any]:
    return {
        **render_freshness(status),
        "name": status.name,
        "eventsApplied": status.events_applied,
        "rebuiltAt": None if status.rebuilt_at is None else format_datetime(status.rebuilt_at),
    }


def render_balance(row: asyncpg.Record, provider: str) -> dict[str, Any]:
    currency = row["currency"]
    return {
        "cardId": row["card_id"],
        "provider": provider,
        "currency": currency,
        "balance": to_major(row["available"], currency),
        "authorized": to_major(row["authorized"], currency),
        "settled": to_major(row["settled"], currency),
        "credited": to_major(row["credited"], currency),
        "debited": to_major(row["debited"], currency),
        "status": row["status"],
        "relationName": row["relation_name"],
        "emissionDate": format_datetime(row["emission_date"]),
        "expiringDate": format_datetime(row["expiring_date"]),
        "issuedAt": format_datetime(row["issued_at"]),
        "lastActivityAt": format_datetime(row["last_activity_at"]),
    }


def render_operation(row: asyncpg.Record, currency: str | None) -> dict[str, Any]:
    rendered = {
        "oid": row["oid"],
        "value": amount(row["value"], currency),
        "date": format_datetime(row["date"]),
        "requestId": row["request_id"],
    }
    if row["kind"] == transaction_history.CANCELLATION and row["released"] is not None:
        rendered["released"] = amount(row["released"], currency)
        rendered["refunded"] = amount(row["refunded"], currency)
    return rendered


def render_transaction(row: asyncpg.Record, operations: list[asyncpg.Record]) -> dict[str, Any]:
    currency = row["currency"]
    return {
        "provider": row["provider"],
        "cardId": row["card_id"],
        "id": row["transaction_id"],
        "source": row["source"],
        "operation": row["operation"],
        "currency": currency,
        "value": amount(row["value"], currency),
        "settled": amount(row["settled"], currency),
        "cancelled": amount(row["cancelled"], currency),
        "description": row["description"],
        "requestId": row["request_id"],
        "orderId": row["order_id"],
        "date": format_datetime(row["date"]),
        "settlements": [
            render_operation(op, currency) for op in operations if op["kind"] == transaction_history.SETTLEMENT
        ],
        "cancellations": [
            render_operation(op, currency) for op in operations if op["kind"] == transaction_history.CANCELLATION
        ],
    }


def render_day(row: asyncpg.Record, native_provider_id: str) -> dict[str, Any]:
    currency = row["currency"]
    native = row["provider"] == native_provider_id
    return {
        "day": row["day"].isoformat(),
        "currency": currency,
        "provider": row["provider"],
        "cardsIssued": row["cards_issued"],
        "transactions": row["transactions"],
        "loaded": amount(row["loaded"], currency),
        "redeemed": amount(row["redeemed"], currency),
        "unclassified": amount(row["unclassified"], currency),
        "settled": amount(row["settled"], currency),
        "cancelled": amount(row["cancelled"], currency),
        "balanceChange": amount(row["balance_change"], currency) if native else None,
        "liability": amount(int(row["liability"]), currency) if native else None,  # an external provider's own
    }


# ---- handlers ------------------------------------------------------------------------------


async def freshness_of(request: web.Request, connection: asyncpg.Connection, name: str) -> dict[str, Any]:
    """Read before the rows, so the rows are at least as fresh as it says (the replica's lag included)."""
    found = await checkpoints.statuses(connection, [name])
    if not found:
        raise ApiError(503, "projection_unknown", f"projection {name} has no checkpoint: run database migrations")
    return with_replica_lag(request, render_freshness(found[0]))


@contextlib.asynccontextmanager
async def reading(request: web.Request, name: str) -> AsyncIterator[tuple[asyncpg.Connection, dict[str, Any]]]:
    """A connection to read projection ``name``'s rows on, and its freshness, read on it first."""
    async with (await read_pool(request)).acquire() as connection:
        yield connection, await freshness_of(request, connection, name)


def page_response(
    window: RestRange, items: list[dict[str, Any]], total: int, freshness: dict[str, Any]
) -> web.Response:
    return json_response({"items": items, "freshness": freshness}, content_range(window, len(items), total))


async def list_balances(request: web.Request) -> web.Response:
    window = parse_rest_range(request.headers.get("REST-Range"))
    where = card_balances.BalanceFilter(
        currency=currency_param(request), status=choice_param(request, "status", card_balances.STATUSES)
    )
    provider = request.app[SETTINGS].native_provider_id
    async with reading(request, card_balances.NAME) as (connection, freshness):
        rows, total = await card_balances.list_balances(connection, where, window.start, window.size)
    return page_response(window, [render_balance(row, provider) for row in rows], total, freshness)


async def get_balance(request: web.Request) -> web.Response:
    card_id = request.match_info["card_id"]
    async with reading(request, card_balances.NAME) as (connection, freshness):
        row = await card_balances.one_balance(connection, card_id)
    if row is None:
        raise CardNotFound(
            f"card {card_id!r} is not in the card_balances read model (unknown, external, or not projected yet: "
            f"{freshness['lagEvents']} event(s) behind)"
        )
    return json_response({**render_balance(row, request.app[SETTINGS].native_provider_id), "freshness": freshness})


async def list_transactions(request: web.Request) -> web.Response:
    window = parse_rest_range(request.headers.get("REST-Range"))
    where = transaction_history.TransactionFilter(
        card_id=text_param(request, "card"),
        provider=text_param(request, "provider"),
        operation=choice_param(request, "operation", OPERATIONS),
        order_id=text_param(request, "orderId"),
        since=instant_param(request, "since"),
        until=instant_param(request, "until"),
    )
    check_order(where.since, where.until)
    async with reading(request, transaction_history.NAME) as (connection, freshness):
        rows, operations, total = await transaction_history.list_transactions(
            connection, where, window.start, window.size
        )
    items = [
        render_transaction(row, operations[(row["provider"], row["card_id"], row["transaction_id"])]) for row in rows
    ]
    return page_response(window, items, total, freshness)


async def list_daily_totals(request: web.Request) -> web.Response:
    window = parse_rest_range(request.headers.get("REST-Range"))
    where = daily_totals.TotalsFilter(
        currency=currency_param(request),
        provider=text_param(request, "provider"),
        since=day_param(request, "since"),
        until=day_param(request, "until"),
    )
    check_order(where.since, where.until)
    native = request.app[SETTINGS].native_provider_id
    async with reading(request, daily_totals.NAME) as (connection, freshness):
        rows, total = await daily_totals.list_totals(connection, where, window.start, window.size)
    return page_response(window, [render_day(row, native) for row in rows], total, freshness)


async def list_projections(request: web.Request) -> web.Response:
    found = await checkpoints.statuses(await read_pool(request))
    return json_response(with_replica_lag(request, {"items": [render_status(status) for status in found]}))


def routes() -> list[web.RouteDef]:
    return [
        web.get(f"{BASE}/balances", list_balances),
        web.get(f"{BASE}/balances/{{card_id}}", get_balance),
        web.get(f"{BASE}/transactions", list_transactions),
        web.get(f"{BASE}/daily-totals", list_daily_totals),
        web.get("/api/projections", list_projections),
    ]
