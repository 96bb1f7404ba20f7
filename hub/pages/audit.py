"""The auditor's view in a browser: server-rendered pages, no script, charts as inline SVG.

- ``GET /audit``: the ledger's totals per provider and currency, the outstanding liability per
  currency over time, and the result of the last ``giftcard audit verify``;
- ``GET /audit/cards/{card_id}[?asOf=ISO8601]``: a card's timeline (every event, who or what
  caused it, the amount it moved, the balance after it), a chart of its balance, its state;
- ``GET /audit/cards?card=ID``: where the overview's "open a card" form lands (a redirect).

A browser cannot send the ``X-VTEX-API`` headers: these pages take the same hub-consumer pairs as
HTTP Basic credentials, with the ``view`` role (``hub.http.auth``). Wire them in with
``app.router.add_routes(hub.pages.audit.routes())``.

The HTML is in ``hub/pages/templates`` (``overview.html.j2``, ``card.html.j2``, ``error.html.j2`` on
``base.html.j2``); this module reads the ledger and hands the templates their figures as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web

from hub.errors import status_of
from hub.http.read_api import instant_param
from hub.http.read_pool import lag_of, read_pool
from hub.http.state import LEDGER, SETTINGS
from hub.pages.card import card_page_context
from hub.pages.charts import ChartPoint, LineChart, line_chart
from hub.pages.rendering import amount_text, decimal_text, html_response
from ledger.application.commands import parse_card_id
from ledger.domain.errors import DomainError
from ledger.eventstore.store import EventStore
from ledger.postgres.tenancy import ALL_TENANTS, current_scope
from projections.audit.auditors import audit_card
from projections.audit.overview import LIABILITY_DAYS_MAX, GroupTotals, Overview, read_overview
from projections.audit.verify_runs import RecordedFailure, VerifyRun
from projections.checkpoints import ProjectionStatus
from projections.exports.totals import major

BASE = "/audit"
CARD_ID_CHARS_MAX = 64  # a UUID is 36; the form's field is free text


async def overview_page(request: web.Request) -> web.Response:
    native = request.app[SETTINGS].native_provider_id
    overview = await read_overview(await read_pool(request), native)
    return page(request, "overview.html.j2", **overview_context(overview, current_scope()))


async def card_page(request: web.Request) -> web.Response:
    try:
        as_of = instant_param(request, "asOf")
        audit = await audit_card(EventStore(await read_pool(request)), request.match_info["card_id"], as_of)
    except DomainError as e:  # an unknown card or a bad asOf: a page that says so, in the page's own format
        return error_page(request, status_of(e), e.message)
    status_at = as_of or request.app[LEDGER].clock()
    context = card_page_context(audit, request.app[SETTINGS].native_provider_id, status_at)
    return page(request, "card.html.j2", **context)


async def open_card(request: web.Request) -> web.Response:
    """The overview's form sends ``?card=ID``; the card's page has a path of its own."""
    wanted = request.query.get("card", "").strip()
    if not wanted or len(wanted) > CARD_ID_CHARS_MAX:
        return error_page(request, 400, "Give a card id (a UUID) to open its audited history.")
    raise web.HTTPSeeOther(f"{BASE}/cards/{quote(wanted, safe='')}")


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    heading = "Not found" if status == 404 else "Cannot show this"
    return page(request, "error.html.j2", status=status, heading=heading, message=message)


def page(request: web.Request, template: str, *, status: int = 200, **context: object) -> web.Response:
    """Every page states the replica lag its reads saw (a browser shows no headers), in the base layout."""
    return html_response(template, status=status, replica_lag=lag_of(request), **context)


def routes() -> list[web.RouteDef]:
    return [
        web.get(BASE, overview_page),
        web.get(f"{BASE}/cards", open_card),
        web.get(f"{BASE}/cards/{{card_id}}", card_page),
    ]


# ---- the overview -------------------------------------------------------------------------------


def overview_context(overview: Overview, scope: str) -> dict[str, object]:
    """What ``overview.html.j2`` shows: figures as text, charts placed, links resolved. An operator's
    view of every tenant (``scope`` ALL_TENANTS, ``hub.http.accounts``) names each row's tenant."""
    tenants = sorted({group.tenant for group in overview.totals})
    return {
        "tenants": tenants if scope == ALL_TENANTS and len(tenants) > 1 else None,
        "coverage": _coverage_text(scope),
        "verify": verify_context(overview.latest_verify),
        "freshness": _freshness_text(overview.freshness),
        "totals": [_totals_row(group) for group in overview.totals],
        "liability_charts": _liability_charts(overview),
        "liability_days_max": LIABILITY_DAYS_MAX,
    }


def _coverage_text(scope: str) -> str:
    return "Every tenant (an operator's view)." if scope == ALL_TENANTS else f"Tenant {scope}."


# ---- the last audit verify ----------------------------------------------------------------------


@dataclass(frozen=True)
class FailureRow:
    failure: RecordedFailure
    card_id: str | None  # the card whose page the failure links to; None for another stream


def verify_context(run: VerifyRun | None) -> dict[str, object]:
    """``verify.html.j2``'s variables: the run (None: never run) and what it takes computing to show."""
    if run is None:
        return {"run": None}
    return {
        "run": run,
        "covered": "every tenant" if run.tenant_id == ALL_TENANTS else f"tenant {run.tenant_id}",
        "took_s": (run.finished_at - run.started_at).total_seconds(),
        "failures": [FailureRow(failure, _card_of(failure.stream_id)) for failure in run.failures],
        "more_failures": run.failures_total - len(run.failures),
    }


def _card_of(stream_id: str | None) -> str | None:
    """A card's stream links to its page; another stream (a provider's, a forwarded call) is named only."""
    if stream_id is None:
        return None
    try:
        return parse_card_id(stream_id)
    except DomainError:
        return None


# ---- liability and totals, from the daily_totals read model ------------------------------------


def _liability_charts(overview: Overview) -> list[LineChart | None]:
    return [
        line_chart(
            [
                ChartPoint(minor, day.isoformat(), f"{day.isoformat()}: {amount_text(minor, currency)} {currency}")
                for day, minor in days
            ],
            currency=currency,
            title=f"{currency}: outstanding at the end of each day, now {amount_text(days[-1][1], currency)}",
            value_title="Outstanding",
            order_title="End of day (UTC)",
            step=False,
            chart_id=f"liability-{currency}",
        )
        for currency, days in overview.liability_by_day.items()
    ]


_TOTAL_FIELDS = ("loaded", "redeemed", "unclassified", "settled", "cancelled")


@dataclass(frozen=True)
class TotalsRow:
    group: GroupTotals
    figures: list[tuple[str, str]]  # (data-field, text) of each amount, in the table's order
    liability: str


def _totals_row(group: GroupTotals) -> TotalsRow:
    figures = [(name, decimal_text(major(getattr(group, name), group.currency))) for name in _TOTAL_FIELDS]
    liability = "-" if group.liability is None else decimal_text(major(group.liability, group.currency))
    return TotalsRow(group, figures, liability)


def _freshness_text(freshness: ProjectionStatus | None) -> str:
    if freshness is None:
        return "The daily_totals projection has no checkpoint: run the database migrations."
    behind = "caught up" if freshness.lag_events == 0 else f"{freshness.lag_events:,} event(s) behind"
    return (
        f"From the daily_totals read model, {behind} "
        f"(the oldest waiting for {freshness.lag_s:.1f} s). Amounts in major units of each currency; "
        "an external provider's currency is not recorded."
    )
