"""The auditor's page of one card: its summary, a chart of its balance, and every event.

Everything comes from ``projections.audit.audit_card``: the card's own events, hash chain
checked and replayed through the domain, exactly what ``giftcard audit card`` and
``GET /api/audit/cards/{id}`` report. Amounts are exact decimals in major units of the card's
currency. Each event's row and chart point carry their figures in ``data-`` attributes, so a
test (or a script an auditor writes) reads the same numbers the page shows.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from hub.markup import Markup, amount_text, esc, fill, instant_text, join
from hub.svg_charts import ChartPoint, line_chart
from ledger.domain.giftcard import DEBIT
from projections import events as ev
from projections.audit import AuditEntry, CardAudit, CardState
from projections.replay import CANCELLATION, Failure, short_type

METADATA_SHOWN_MAX = 6  # keys of an event's metadata shown in "caused by"
METADATA_VALUE_CHARS_MAX = 200
NOT_APPLIED = "not applied"


class IssueFacts(msgspec.Struct):
    """What the issue event says of the card beyond its money (absent fields stay unknown)."""

    caption: str | None = None
    relation_name: str | None = None
    emission_date: str | None = None
    expiring_date: str | None = None


_issue_decoder = msgspec.json.Decoder(IssueFacts)


def issue_facts(audit: CardAudit) -> IssueFacts:
    """From the card's issue event; an issue that does not decode (an altered event) tells nothing."""
    issue = next((entry.event for entry in audit.entries if entry.event.type == ev.ISSUED), None)
    if issue is None:
        return IssueFacts()
    try:
        return _issue_decoder.decode(issue.data)
    except msgspec.DecodeError:
        return IssueFacts()


def validity_status(facts: IssueFacts, at: datetime) -> str:
    """As the card_balances read model names it: active, expired or not yet valid at ``at``."""
    try:
        emission = ev.instant(facts.emission_date) if facts.emission_date else None
        expiring = ev.instant(facts.expiring_date) if facts.expiring_date else None
    except ValueError:
        return "unknown"
    if expiring is not None and at > expiring:
        return "expired"
    if emission is not None and at < emission:
        return "not yet valid"
    return "active"


def render_card_page(audit: CardAudit, provider: str, status_at: datetime) -> Markup:
    facts = issue_facts(audit)
    currency = audit.currency
    parts = [
        _heading(audit, facts, provider),
        _summary(audit, facts, status_at),
        _failures(audit.failures),
        _balance_chart(audit) if currency else Markup(""),
        _as_of_form(audit),
        Markup("<h2>Timeline</h2>"),
        _timeline(audit),
        _transactions(audit.state, currency),
        fill(
            "<footer>The same history as JSON: <code>GET /api/audit/cards/{id}</code> (hub-consumer headers) or "
            "<code>giftcard audit card {id} --json</code>. Times are UTC, as the ledger's clock wrote them in "
            "each event (the hash chain covers them).</footer>",
            id=audit.card_id,
        ),
    ]
    return join(parts)


def _heading(audit: CardAudit, facts: IssueFacts, provider: str) -> Markup:
    verdict = (
        fill('<span class="badge good" id="verdict">Hash chain and rules hold</span>')
        if not audit.failures
        else fill('<span class="badge bad" id="verdict">{n} failure(s)</span>', n=len(audit.failures))
    )
    return fill(
        '<p class="muted"><a href="/audit">Audit overview</a> / card</p>'
        '<h1>{caption} <span class="muted mono" id="card-id">{id}</span></h1>'
        '<p class="lead">relation <strong>{relation}</strong> · provider {provider} · {verdict}</p>',
        caption=facts.caption or "Gift card",
        id=audit.card_id,
        relation=facts.relation_name or "unknown",
        provider=provider,
        verdict=verdict,
    )


def _summary(audit: CardAudit, facts: IssueFacts, status_at: datetime) -> Markup:
    state, currency = audit.state, audit.currency
    as_of = f" as of {instant_text(audit.as_of)}" if audit.as_of else ""
    if state is None or currency is None:
        return fill('<section class="card"><p>The card did not exist yet{as_of}.</p></section>', as_of=as_of)
    figures = state.balances
    open_holds = sum(1 for t in state.transactions if t.operation == DEBIT and t.held > 0)
    facts_shown = [
        ("balance", f"Balance{as_of}", f"{amount_text(figures.available, currency)} {currency}"),
        ("authorized", "Held by authorizations", f"{amount_text(figures.authorized, currency)} {currency}"),
        ("open-holds", "Open holds", str(open_holds)),
        ("settled", "Settled (captured, less refunds)", f"{amount_text(figures.settled, currency)} {currency}"),
        ("credited", "Credited (net of cancellations)", f"{amount_text(figures.credited, currency)} {currency}"),
        ("debited", "Debited (net of cancellations)", f"{amount_text(figures.debited, currency)} {currency}"),
        ("currency", "Currency", currency),
        ("status", f"Status at {instant_text(status_at)}", validity_status(facts, status_at)),
        ("valid-from", "Valid from", _written_instant(facts.emission_date)),
        ("valid-until", "Valid until", _written_instant(facts.expiring_date)),
        ("version", "Version", str(state.version)),
        ("events", "Events", str(len(audit.entries))),
    ]
    items = [
        fill('<div><dt>{label}</dt><dd data-field="{field}">{value}</dd></div>', field=field, label=label, value=value)
        for field, label, value in facts_shown
    ]
    return fill('<section class="card"><dl class="facts" id="summary">{items}</dl></section>', items=join(items))


def _written_instant(value: str | None) -> str:
    if not value:
        return "unknown"
    try:
        return instant_text(ev.instant(value))
    except ValueError:
        return value  # an altered event: shown as it was written


def _failures(failures: list[Failure]) -> Markup:
    if not failures:
        return Markup("")
    items = [
        fill(
            "<li><strong>{rule}</strong> at version {version}: {message}</li>",
            rule=f.rule,
            version=f.version if f.version is not None else "-",
            message=f.message,
        )
        for f in failures
    ]
    return fill('<h2>Failures</h2><ul class="failures" id="failures">{items}</ul>', items=join(items))


def _balance_chart(audit: CardAudit) -> Markup:
    currency = audit.currency
    assert currency is not None
    points = [
        ChartPoint(
            entry.step.balance,
            f"v{entry.event.version} · {entry.effective_at:%Y-%m-%d}",
            f"v{entry.event.version} {short_type(entry.event.type)} at {instant_text(entry.effective_at)}: "
            f"{amount_text(entry.step.balance, currency)} {currency}",
        )
        for entry in audit.entries
        if entry.step is not None  # an event the replay could not apply has no balance after it
    ]
    chart = line_chart(
        points,
        currency=currency,
        title="Balance after each event",
        value_title="Balance",
        order_title="Event (version · effective date, UTC)",
        step=True,  # a balance holds its value until the next event
        chart_id="balance-chart",
    )
    return fill("<h2>Balance over time</h2>{chart}", chart=chart)


def _as_of_form(audit: CardAudit) -> Markup:
    return fill(
        '<form class="inline" method="get" action="/audit/cards/{id}">'
        '<label for="asOf">State as of (ISO 8601, UTC)</label>'
        '<input id="asOf" name="asOf" value="{value}" placeholder="2026-01-31T23:59:59Z">'
        '<button type="submit">Show</button> <a href="/audit/cards/{id}">latest</a></form>',
        id=audit.card_id,
        value=audit.as_of.isoformat() if audit.as_of else "",
    )


# ---- the timeline ------------------------------------------------------------------------------

_TIMELINE_HEAD = (
    '<div class="table-wrap"><table id="timeline"><thead><tr><th class="num">#</th><th>Effective at (UTC)</th>'
    '<th>Event</th><th>Transaction</th><th>Caused by</th><th class="num">Amount ({currency})</th>'
    '<th class="num">Balance change</th><th class="num">Balance after</th></tr></thead><tbody>{rows}</tbody>'
    "</table></div>"
)


def _timeline(audit: CardAudit) -> Markup:
    failed_versions = {f.version for f in audit.failures}
    rows, previous = [], 0
    for entry in audit.entries:
        rows.append(_event_row(entry, audit.currency, previous, entry.event.version in failed_versions))
        if entry.step is not None:
            previous = entry.step.balance
    return fill(_TIMELINE_HEAD, currency=audit.currency or "?", rows=join(rows))


def _event_row(entry: AuditEntry, currency: str | None, balance_before: int, failed: bool) -> Markup:
    event, step = entry.event, entry.step
    classes = " ".join(c for c in ("failed" if failed else "", "after-as-of" if entry.after_as_of else "") if c)
    applied = step is not None and currency is not None
    balance = amount_text(step.balance, currency).replace(",", "") if applied else ""
    return fill(
        '<tr class="{classes}" data-row="event" data-version="{version}" data-balance="{balance}">'
        '<td class="num" data-field="version">{version}</td>'
        '<td class="nowrap" data-field="at" title="recorded at {recorded}">{at}</td>'
        '<td data-field="type">{type}</td><td data-field="transaction">{transaction}</td>'
        '<td class="caused-by" data-field="caused-by">{caused_by}</td>'
        '<td class="num" data-field="amount">{amount}</td>'
        '<td class="num" data-field="change">{change}</td>'
        '<td class="num" data-field="balance">{balance_text}</td></tr>',
        classes=classes,
        version=event.version,
        balance=balance,
        recorded=instant_text(event.recorded_at),
        at=instant_text(entry.effective_at),
        type=_event_kind(entry, currency),
        transaction=_transaction_cell(entry),
        caused_by=caused_by(event.metadata),
        amount=_amount_cell(entry, currency),
        change=_change_cell(entry, currency, balance_before),
        balance_text=amount_text(step.balance, currency) if applied else NOT_APPLIED,
    )


def _event_kind(entry: AuditEntry, currency: str | None) -> Markup:
    step, name = entry.step, short_type(entry.event.type)
    if step is None or step.kind != CANCELLATION or currency is None:
        return esc(name)
    return fill(
        '{name}<br><span class="muted">released {released}, refunded {refunded}</span>',
        name=name,
        released=amount_text(step.released or 0, currency),
        refunded=amount_text(step.refunded or 0, currency),
    )


def _transaction_cell(entry: AuditEntry) -> Markup:
    transaction = entry.step.transaction if entry.step else None
    if transaction is None:
        return Markup("")
    return fill(
        '{operation}<br><span class="mono muted">{id}</span>', operation=transaction.operation, id=transaction.id
    )


def caused_by(metadata: dict[str, object]) -> Markup:
    """Who or what wrote the event: the actor (an app key, ``hold-expiry``, ``cli:…``), the route and the
    request id, then any other metadata; values are data, so each is escaped and cut to a readable length."""
    if not metadata:
        return Markup('<span class="muted nowrap">not recorded</span>')
    actor = metadata.get("actor")
    details = [
        f"{name} {_short(value)}" for name, value in metadata.items() if name != "actor" and value not in (None, "")
    ]
    return fill(
        '<span data-field="actor">{actor}</span><br><span class="muted">{details}</span>',
        actor=_short(actor) if actor else "unknown actor",
        details=" · ".join(details[:METADATA_SHOWN_MAX]),
    )


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= METADATA_VALUE_CHARS_MAX else text[:METADATA_VALUE_CHARS_MAX] + "…"


def _amount_cell(entry: AuditEntry, currency: str | None) -> str:
    step = entry.step
    if step is None or step.amount is None or currency is None:
        return ""
    return amount_text(step.amount, currency)


def _change_cell(entry: AuditEntry, currency: str | None, balance_before: int) -> Markup:
    step = entry.step
    if step is None or currency is None:
        return Markup("")
    change = step.balance - balance_before
    tone = "positive" if change > 0 else "negative" if change < 0 else "muted"
    return fill('<span class="{tone}">{text}</span>', tone=tone, text=amount_text(change, currency, signed=True))


# ---- the card's transactions as they stand -------------------------------------------------------


def _transactions(state: CardState | None, currency: str | None) -> Markup:
    if state is None or currency is None or not state.transactions:
        return Markup("")
    rows = [
        fill(
            '<tr data-row="transaction" data-transaction="{id}"><td class="mono">{id}</td><td>{operation}</td>'
            '<td>{date}</td><td class="num">{value}</td><td class="num">{settled}</td><td class="num">{released}</td>'
            '<td class="num">{refunded}</td><td class="num">{held}</td></tr>',
            id=t.id,
            operation=t.operation,
            date=_written_instant(t.date),
            value=amount_text(t.value, currency),
            settled=amount_text(t.settled, currency),
            released=amount_text(t.released, currency),
            refunded=amount_text(t.refunded, currency),
            held=amount_text(t.held, currency),
        )
        for t in state.transactions
    ]
    return fill(
        '<h2>Transactions at version {version}</h2><div class="table-wrap"><table id="transactions"><thead><tr>'
        '<th>Transaction</th><th>Operation</th><th>Date (UTC)</th><th class="num">Value ({currency})</th>'
        '<th class="num">Settled</th><th class="num">Released</th><th class="num">Refunded</th>'
        '<th class="num">Still held</th></tr></thead><tbody>{rows}</tbody></table></div>',
        version=state.version,
        currency=currency,
        rows=join(rows),
    )
