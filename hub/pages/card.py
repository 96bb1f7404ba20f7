"""The auditor's page of one card: its summary, a chart of its balance, and every event.

Everything comes from ``projections.audit.auditors.audit_card``: the card's own events, hash chain
checked and replayed through the domain, exactly what ``giftcard audit card`` and
``GET /api/audit/cards/{id}`` report. Amounts are exact decimals in major units of the card's
currency. Each event's row and chart point carry their figures in ``data-`` attributes, so a
test (or a script an auditor writes) reads the same numbers the page shows.

This module turns the audit into what ``templates/card.html.j2`` shows (figures as text, rows with
their classes); the template writes the HTML.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import msgspec

from hub.pages.charts import ChartPoint, LineChart, line_chart
from hub.pages.rendering import amount_text, instant_text, written_instant_text
from ledger.domain.giftcard import DEBIT, Transaction
from projections import events as ev
from projections.audit.auditors import AuditEntry, CardAudit
from projections.audit.replay import CANCELLATION, short_type

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
    issue = next((entry.event for entry in audit.entries if entry.event.name == ev.ISSUED), None)
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


def card_page_context(audit: CardAudit, provider: str, status_at: datetime) -> dict[str, object]:
    """What ``card.html.j2`` shows of ``audit``; ``status_at`` is the instant its validity is judged at."""
    facts = issue_facts(audit)
    return {
        "audit": audit,
        "provider": provider,
        "caption": facts.caption or "Gift card",
        "relation": facts.relation_name or "unknown",
        "as_of_text": as_of_text(audit),
        "summary": summary_facts(audit, facts, status_at),
        "chart": _balance_chart(audit) if audit.currency else None,
        "events": event_rows(audit),
    }


def as_of_text(audit: CardAudit) -> str:
    """`` as of 2026-01-16 18:00:00`` when the page shows the card at an instant; "" for its latest state."""
    return f" as of {instant_text(audit.as_of)}" if audit.as_of else ""


@dataclass(frozen=True)
class Fact:
    field: str  # its data-field, for whoever reads the page's numbers
    label: str
    value: str


def summary_facts(audit: CardAudit, facts: IssueFacts, status_at: datetime) -> list[Fact]:
    """The card's figures at its version (or as of the instant asked); empty when it did not exist yet."""
    state, currency = audit.state, audit.currency
    if state is None or currency is None:
        return []
    figures = state.balances
    as_of = as_of_text(audit)
    open_holds = sum(1 for t in state.transactions if t.operation == DEBIT and t.held > 0)
    return [
        Fact("balance", f"Balance{as_of}", f"{amount_text(figures.available, currency)} {currency}"),
        Fact("authorized", "Held by authorizations", f"{amount_text(figures.authorized, currency)} {currency}"),
        Fact("open-holds", "Open holds", str(open_holds)),
        Fact("settled", "Settled (captured, less refunds)", f"{amount_text(figures.settled, currency)} {currency}"),
        Fact("credited", "Credited (net of cancellations)", f"{amount_text(figures.credited, currency)} {currency}"),
        Fact("debited", "Debited (net of cancellations)", f"{amount_text(figures.debited, currency)} {currency}"),
        Fact("currency", "Currency", currency),
        Fact("status", f"Status at {instant_text(status_at)}", validity_status(facts, status_at)),
        Fact("valid-from", "Valid from", written_instant_text(facts.emission_date)),
        Fact("valid-until", "Valid until", written_instant_text(facts.expiring_date)),
        Fact("version", "Version", str(state.version)),
        Fact("events", "Events", str(len(audit.entries))),
    ]


def _balance_chart(audit: CardAudit) -> LineChart | None:
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
    return line_chart(
        points,
        currency=currency,
        title="Balance after each event",
        value_title="Balance",
        order_title="Event (version · effective date, UTC)",
        step=True,  # a balance holds its value until the next event
        chart_id="balance-chart",
    )


# ---- the timeline ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cancellation:
    released: str
    refunded: str


@dataclass(frozen=True)
class CausedBy:
    actor: str
    details: str


@dataclass(frozen=True)
class Change:
    tone: str  # a CSS class: positive, negative or muted
    text: str


@dataclass(frozen=True)
class EventRow:
    """One row of the timeline, its figures as the page shows them ("" where the event moved none)."""

    entry: AuditEntry
    classes: str
    balance: str  # the exact balance after the event, ungrouped (data-balance); "" when not applied
    kind: str
    cancellation: Cancellation | None
    transaction: Transaction | None
    caused_by: CausedBy | None  # None: the event recorded no metadata
    amount: str
    change: Change | None
    balance_text: str


def event_rows(audit: CardAudit) -> list[EventRow]:
    failed_versions = {f.version for f in audit.failures}
    rows, previous = [], 0
    for entry in audit.entries:
        rows.append(_event_row(entry, audit.currency, previous, entry.event.version in failed_versions))
        if entry.step is not None:
            previous = entry.step.balance
    return rows


def _event_row(entry: AuditEntry, currency: str | None, balance_before: int, failed: bool) -> EventRow:
    step = entry.step
    classes = " ".join(c for c in ("failed" if failed else "", "after-as-of" if entry.after_as_of else "") if c)
    applied = step is not None and currency is not None
    return EventRow(
        entry=entry,
        classes=classes,
        balance=amount_text(step.balance, currency).replace(",", "") if applied else "",
        kind=short_type(entry.event.type),
        cancellation=_cancellation(entry, currency),
        transaction=step.transaction if step else None,
        caused_by=caused_by(entry.event.metadata),
        amount=_amount_cell(entry, currency),
        change=_change(entry, currency, balance_before),
        balance_text=amount_text(step.balance, currency) if applied else NOT_APPLIED,
    )


def _cancellation(entry: AuditEntry, currency: str | None) -> Cancellation | None:
    step = entry.step
    if step is None or step.kind != CANCELLATION or currency is None:
        return None
    return Cancellation(amount_text(step.released or 0, currency), amount_text(step.refunded or 0, currency))


def caused_by(metadata: dict[str, object]) -> CausedBy | None:
    """Who or what wrote the event: the actor (an app key, ``hold-expiry``, ``cli:…``), then the route, the
    request id and any other metadata; values are data, each cut to a readable length (the template escapes)."""
    if not metadata:
        return None
    actor = metadata.get("actor")
    details = [
        f"{name} {_short(value)}" for name, value in metadata.items() if name != "actor" and value not in (None, "")
    ]
    return CausedBy(
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


def _change(entry: AuditEntry, currency: str | None, balance_before: int) -> Change | None:
    step = entry.step
    if step is None or currency is None:
        return None
    change = step.balance - balance_before
    tone = "positive" if change > 0 else "negative" if change < 0 else "muted"
    return Change(tone, amount_text(change, currency, signed=True))
