"""The auditor's view in a browser: server-rendered pages, no script, charts as inline SVG.

- ``GET /audit``: the ledger's totals per provider and currency, the outstanding liability per
  currency over time, and the result of the last ``giftcard audit verify``;
- ``GET /audit/cards/{card_id}[?asOf=ISO8601]``: a card's timeline (every event, who or what
  caused it, the amount it moved, the balance after it), a chart of its balance, its state;
- ``GET /audit/cards?card=ID``: where the overview's "open a card" form lands (a redirect).

A browser cannot send the ``X-VTEX-API`` headers: these pages take the same hub-consumer pairs as
HTTP Basic credentials, with the ``view`` role (``hub.auth``). Wire them in with
``app.router.add_routes(audit_pages.routes())``.
"""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from hub.audit_card_page import render_card_page
from hub.errors import status_of
from hub.markup import Markup, amount_text, decimal_text, esc, fill, instant_text, join, page
from hub.read_api import instant_param
from hub.read_pool import lag_note, read_pool
from hub.state import LEDGER, SETTINGS
from hub.svg_charts import ChartPoint, line_chart
from ledger.commands import parse_card_id
from ledger.domain.errors import DomainError
from ledger.store import EventStore
from projections.audit import audit_card
from projections.audit_overview import LIABILITY_DAYS_MAX, GroupTotals, Overview, read_overview
from projections.checkpoints import ProjectionStatus
from projections.totals import major
from projections.verify_runs import RecordedFailure, VerifyRun

BASE = "/audit"
CARD_ID_CHARS_MAX = 64  # a UUID is 36; the form's field is free text
NO_NOTE = Markup("")


async def overview_page(request: web.Request) -> web.Response:
    native = request.app[SETTINGS].native_provider_id
    overview = await read_overview(await read_pool(request), native)
    return page("Audit overview · Gift card ledger", join([lag_note(request), render_overview(overview)]))


async def card_page(request: web.Request) -> web.Response:
    try:
        as_of = instant_param(request, "asOf")
        audit = await audit_card(EventStore(await read_pool(request)), request.match_info["card_id"], as_of)
    except DomainError as e:  # an unknown card or a bad asOf: a page that says so, in the page's own format
        return error_page(status_of(e), e.message, lag_note(request))
    status_at = as_of or request.app[LEDGER].clock()
    body = render_card_page(audit, request.app[SETTINGS].native_provider_id, status_at)
    return page(f"Card {audit.card_id} · Audit", join([lag_note(request), body]))


async def open_card(request: web.Request) -> web.Response:
    """The overview's form sends ``?card=ID``; the card's page has a path of its own."""
    wanted = request.query.get("card", "").strip()
    if not wanted or len(wanted) > CARD_ID_CHARS_MAX:
        return error_page(400, "Give a card id (a UUID) to open its audited history.")
    raise web.HTTPSeeOther(f"{BASE}/cards/{quote(wanted, safe='')}")


def error_page(status: int, message: str, note: Markup = NO_NOTE) -> web.Response:
    body = fill(
        '<h1>{title}</h1><p class="lead" id="error">{message}</p>{note}<p><a href="/audit">Back to the overview</a></p>',
        title="Not found" if status == 404 else "Cannot show this",
        message=message,
        note=note,
    )
    return page("Audit · Gift card ledger", body, status=status)


def routes() -> list[web.RouteDef]:
    return [
        web.get(BASE, overview_page),
        web.get(f"{BASE}/cards", open_card),
        web.get(f"{BASE}/cards/{{card_id}}", card_page),
    ]


# ---- the overview -------------------------------------------------------------------------------


def render_overview(overview: Overview) -> Markup:
    return join(
        [
            Markup(
                '<h1>Audit overview</h1><p class="lead">Derived from the ledger\'s immutable events: the verdict '
                "of the last <code>giftcard audit verify</code>, and totals and liability from the "
                "<code>daily_totals</code> read model (its freshness is stated).</p>"
            ),
            _open_card_form(),
            _verify_section(overview.latest_verify),
            _totals_section(overview.totals, overview.freshness),
            _liability_section(overview),
        ]
    )


def _open_card_form() -> Markup:
    return Markup(
        '<section class="card"><form class="inline" method="get" action="/audit/cards">'
        '<label for="card">Open a card\'s audited history</label>'
        '<input id="card" name="card" placeholder="card id, e.g. 674df61f-…" required>'
        '<button type="submit">Open</button></form></section>'
    )


# ---- the last audit verify ----------------------------------------------------------------------


def _verify_section(run: VerifyRun | None) -> Markup:
    if run is None:
        return Markup(
            '<h2>Last <code>audit verify</code></h2><section class="card" id="verify">'
            '<p><span class="badge neutral" id="verify-verdict">never run</span> No run of '
            "<code>giftcard audit verify</code> has been recorded against this database. Run it (it walks every "
            "stream: hash chains, rules, snapshots and read models) and its result appears here.</p></section>"
        )
    verdict = (
        fill('<span class="badge good" id="verify-verdict">all rules hold</span>')
        if run.ok
        else fill('<span class="badge bad" id="verify-verdict">{n} failure(s)</span>', n=f"{run.failures_total:,}")
    )
    took_s = (run.finished_at - run.started_at).total_seconds()
    return fill(
        '<h2>Last <code>audit verify</code></h2><section class="card" id="verify" data-run="{id}">'
        "<p>{verdict} finished {finished} UTC (took {took:.1f} s): {events} event(s) in {streams} stream(s), "
        "{cards} card(s).</p>{failures}{models}{totals}</section>",
        id=run.id,
        verdict=verdict,
        finished=instant_text(run.finished_at),
        took=took_s,
        events=f"{run.events:,}",
        streams=f"{run.streams:,}",
        cards=f"{run.cards:,}",
        failures=_verify_failures(run),
        models=_verify_read_models(run),
        totals=_verify_totals(run),
    )


def _verify_failures(run: VerifyRun) -> Markup:
    if not run.failures:
        return Markup("")
    rows = [_failure_row(failure) for failure in run.failures]
    more = run.failures_total - len(run.failures)
    note = (
        fill('<p class="muted">and {n} more: run <code>giftcard audit verify</code> to list every one.</p>', n=more)
        if more > 0
        else Markup("")
    )
    return fill(
        '<div class="table-wrap"><table id="verify-failures"><thead><tr><th>Stream</th><th class="num">Version</th>'
        "<th>Rule</th><th>What does not hold</th></tr></thead><tbody>{rows}</tbody></table></div>{note}",
        rows=join(rows),
        note=note,
    )


def _failure_row(failure: RecordedFailure) -> Markup:
    return fill(
        '<tr data-row="verify-failure"><td class="mono">{stream}</td><td class="num">{version}</td>'
        "<td>{rule}</td><td>{message}</td></tr>",
        stream=_stream_link(failure.stream_id),
        version=failure.version if failure.version is not None else "",
        rule=failure.rule,
        message=failure.message,
    )


def _stream_link(stream_id: str | None) -> Markup:
    """A card's stream links to its page; another stream (a provider's, a forwarded call) is named only."""
    if stream_id is None:
        return Markup("-")
    try:
        card_id = parse_card_id(stream_id)
    except DomainError:
        return esc(stream_id)
    return fill('<a href="/audit/cards/{id}">{id}</a>', id=card_id)


def _verify_read_models(run: VerifyRun) -> Markup:
    rows = [
        fill(
            '<tr><td>{name}</td><td class="num">{compared}</td><td class="num">{tx}:{position}</td>'
            '<td class="num">{lag}</td></tr>',
            name=model.name,
            compared=f"{model.compared:,}",
            tx=model.checkpoint.tx,
            position=model.checkpoint.position,
            lag=f"{model.lag_events:,}",
        )
        for model in run.read_models
    ]
    return fill(
        '<details><summary>Read models compared with the replay</summary><div class="table-wrap"><table>'
        '<thead><tr><th>Read model</th><th class="num">Rows compared</th><th class="num">At checkpoint</th>'
        '<th class="num">Later events (lag)</th></tr></thead><tbody>{rows}</tbody></table></div></details>',
        rows=join(rows),
    )


def _verify_totals(run: VerifyRun) -> Markup:
    rows = [
        fill(
            '<tr data-row="verify-total"><td>{provider}</td><td>{currency}</td><td>{kind}</td><td>{operation}</td>'
            '<td class="num">{count}</td><td class="num" data-field="amount">{amount}</td></tr>',
            provider=total.provider,
            currency=total.currency or "not recorded",
            kind=total.kind,
            operation=total.operation or "-",
            count=f"{total.count:,}",
            amount=decimal_text(total.amount),
        )
        for total in run.totals
    ]
    return fill(
        "<details><summary>Totals computed from the replay (they equal <code>giftcard export transactions</code>'s)"
        '</summary><div class="table-wrap"><table id="verify-totals"><thead><tr><th>Provider</th><th>Currency</th>'
        '<th>Kind</th><th>Operation</th><th class="num">Count</th><th class="num">Amount</th></tr></thead>'
        "<tbody>{rows}</tbody></table></div></details>",
        rows=join(rows),
    )


# ---- liability and totals, from the daily_totals read model ------------------------------------


def _liability_section(overview: Overview) -> Markup:
    if not overview.liability_by_day:
        return Markup('<h2>Outstanding liability</h2><p class="muted">No native card holds money yet.</p>')
    charts = [
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
    return fill(
        "<h2>Outstanding liability per currency</h2>"
        '<p class="muted">What native cards hold at the end of each UTC day (the last {days} days at most), '
        "as <code>/api/ledger/daily-totals</code> reports it.</p>{charts}",
        days=LIABILITY_DAYS_MAX,
        charts=join(charts),
    )


_TOTAL_FIELDS = ("loaded", "redeemed", "unclassified", "settled", "cancelled")


def _totals_section(totals: list[GroupTotals], freshness: ProjectionStatus | None) -> Markup:
    rows = [_totals_row(group) for group in totals]
    body = join(rows) if rows else Markup('<tr><td colspan="10" class="muted">Nothing recorded yet.</td></tr>')
    return fill(
        '<h2>Ledger totals</h2><p class="muted">{freshness}</p>'
        '<div class="table-wrap"><table id="totals"><thead><tr><th>Provider</th><th>Currency</th>'
        '<th class="num">Cards issued</th><th class="num">Transactions</th><th class="num">Loaded (Credits)</th>'
        '<th class="num">Redeemed (Debits)</th><th class="num">Unclassified</th><th class="num">Settled</th>'
        '<th class="num">Cancelled</th><th class="num">Outstanding</th></tr></thead><tbody>{rows}</tbody></table>'
        "</div>",
        freshness=_freshness_text(freshness),
        rows=body,
    )


def _totals_row(group: GroupTotals) -> Markup:
    cells = [
        fill('<td class="num" data-field="{name}">{value}</td>', name=name, value=_total_text(group, name))
        for name in _TOTAL_FIELDS
    ]
    liability = "-" if group.liability is None else decimal_text(major(group.liability, group.currency))
    return fill(
        '<tr data-row="total" data-provider="{provider}" data-currency="{currency}"><td>{provider}</td>'
        '<td>{currency_text}</td><td class="num" data-field="cards-issued">{cards}</td>'
        '<td class="num" data-field="transactions">{transactions}</td>{cells}'
        '<td class="num" data-field="liability">{liability}</td></tr>',
        provider=group.provider,
        currency=group.currency or "",
        currency_text=group.currency or "not recorded",
        cards=f"{group.cards_issued:,}",
        transactions=f"{group.transactions:,}",
        cells=join(cells),
        liability=liability,
    )


def _total_text(group: GroupTotals, name: str) -> str:
    return decimal_text(major(getattr(group, name), group.currency))


def _freshness_text(freshness: ProjectionStatus | None) -> str:
    if freshness is None:
        return "The daily_totals projection has no checkpoint: run the database migrations."
    behind = "caught up" if freshness.lag_events == 0 else f"{freshness.lag_events:,} event(s) behind"
    if freshness.lag_events_capped:
        behind = f"at least {behind}"
    return (
        f"From the daily_totals read model at position {freshness.checkpoint.position:,}, {behind} "
        f"(the oldest waiting for {freshness.lag_s:.1f} s). Amounts in major units of each currency; "
        "an external provider's currency is not recorded."
    )
