"""The liability roll-forward of a period in the auditor's view, each figure linking to the movements
behind it, and each movement to the card and event that made it.

- ``GET /audit/rollforward?from=DAY&to=DAY``: what ``giftcard finance rollforward`` prints, per currency;
- ``GET /audit/rollforward/movements?from=DAY&to=DAY&currency=C&movement=KIND``: the movements of one
  figure (the first ``MOVEMENT_ROWS_MAX``), with their count and total.

Both walk the card events (``projections.finance``) on the read pool: a month of a large ledger
takes what the command takes, so the command stays the tool for a full close.
"""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from hub.errors import status_of
from hub.http.read_api import day_param
from hub.http.read_pool import read_pool
from hub.http.state import SETTINGS
from hub.pages.audit import BASE, error_page, page
from ledger.domain.errors import DomainError, InvalidRequest
from ledger.domain.money import exponent_of
from projections.finance.config import FinanceConfigError, finance_config_at
from projections.finance.rollforward import Period, movements_behind, render_roll_forward, roll_forward
from projections.finance.walk import LIABILITY_MOVEMENTS

MOVEMENT_ROWS_MAX = 500
PERIOD_DAYS_MAX = 366  # a page answers within a request; a longer close is the command's


async def rollforward_page(request: web.Request) -> web.Response:
    try:
        period = _period(request)
        config = finance_config_at(request.app[SETTINGS].finance_config)
    except DomainError as e:
        return error_page(request, status_of(e), e.message)
    except FinanceConfigError as e:  # the service's own configuration: not the caller's fault
        return error_page(request, 503, str(e))
    if period is None:
        return page(request, "rollforward.html.j2", period=None, document=None, query="")
    result = await roll_forward(await read_pool(request), period, config)
    document = render_roll_forward(result)
    return page(request, "rollforward.html.j2", period=period, document=document, query=_query(request, period))


async def movements_page(request: web.Request) -> web.Response:
    try:
        period = _period(request, required=True)
        currency = _currency(request)
        kind = _movement(request)
        config = finance_config_at(request.app[SETTINGS].finance_config)
    except DomainError as e:
        return error_page(request, status_of(e), e.message)
    except FinanceConfigError as e:
        return error_page(request, 503, str(e))
    assert period is not None
    found = await movements_behind(await read_pool(request), period, config, currency, kind, rows_max=MOVEMENT_ROWS_MAX)
    return page(
        request,
        "movements.html.j2",
        period=period,
        currency=currency,
        movement=kind,
        found=found,
        rows_max=MOVEMENT_ROWS_MAX,
        query=_query(request, period),
    )


def routes() -> list[web.RouteDef]:
    return [web.get(f"{BASE}/rollforward", rollforward_page), web.get(f"{BASE}/rollforward/movements", movements_page)]


def _period(request: web.Request, *, required: bool = False) -> Period | None:
    first, last = day_param(request, "from"), day_param(request, "to")
    if first is None and last is None and not required:
        return None
    if first is None or last is None:
        raise InvalidRequest("give both from and to, dates like 2026-01-31")
    if last < first:
        raise InvalidRequest(f"to ({last.isoformat()}) must not be before from ({first.isoformat()})")
    if (last - first).days > PERIOD_DAYS_MAX:
        raise InvalidRequest(
            f"a period is at most {PERIOD_DAYS_MAX} days on this page; use giftcard finance rollforward"
        )
    return Period(first, last)


def _currency(request: web.Request) -> str:
    currency = request.query.get("currency", "")
    exponent_of(currency)  # an unknown currency: UnknownCurrency, a 400 naming it
    return currency


def _movement(request: web.Request) -> str:
    kind = request.query.get("movement", "")
    if kind not in LIABILITY_MOVEMENTS:
        raise InvalidRequest(f"movement must be one of {', '.join(LIABILITY_MOVEMENTS)}, got {kind!r}")
    return kind


def _query(request: web.Request, period: Period) -> str:
    """The period, and the tenant asked for (hub.http.accounts): a figure's movements are of the same tenants."""
    tenant = request.query.get("tenant")
    named = f"&tenant={quote(tenant, safe='')}" if tenant else ""
    return f"from={period.first_day.isoformat()}&to={period.last_day.isoformat()}{named}"
