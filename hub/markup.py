"""A small, escaping HTML template kit for the server-rendered pages (the auditor's view).

Every value that comes from data goes through ``html.escape``: ``fill`` escapes each value it
inserts unless it is ``Markup`` (text this module or its callers already built from escaped
parts), so a caption like ``<script>`` prints as text. Templates are ``str.format`` strings
that are constants of the code, never data; CSS stays out of them (its braces would clash).

The pages carry no script at all, and their Content-Security-Policy says so: even a value that
escaped escaping could not run.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal

from aiohttp import web

from ledger.money import to_major

# No script, no fetch, no frame: inline styles and inline SVG are all a page uses.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # what an auditor sees is the ledger's money: never kept by a shared cache
}


class Markup(str):
    """HTML built from escaped parts: inserted as it is."""


def esc(value: object) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def fill(template: str, **values: object) -> Markup:
    """``template`` with each ``{name}`` replaced by its value, escaped unless it is ``Markup``.

    Numbers stay numbers, so that a template may format them (``{x:.1f}``): they print no markup.
    """
    return Markup(template.format(**{name: _safe(value) for name, value in values.items()}))


def _safe(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return esc(value)


def join(parts: Iterable[object], separator: str = "") -> Markup:
    return Markup(separator.join(esc(part) for part in parts))


# ---- numbers and times, as people read them --------------------------------------------------


def decimal_text(value: Decimal, *, signed: bool = False) -> str:
    """An exact decimal with thousands grouped (``1,234.50``); ``signed`` adds ``+`` to a positive.

    ASCII ``-``, not a typographic minus, so a figure copied into a spreadsheet stays a number.
    """
    text = f"{value:,}"
    return f"+{text}" if signed and value > 0 else text


def amount_text(minor: int, currency: str, *, signed: bool = False) -> str:
    return decimal_text(to_major(minor, currency), signed=signed)


def instant_text(moment: datetime) -> str:
    """``2026-01-15 12:00:00`` (UTC, the zone every page states in its headings)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# ---- the page around the content ---------------------------------------------------------------

_STYLE = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --paper: #ffffff; --wash: #f5f7fa;
        --accent: #2563eb; --good: #15803d; --good-wash: #dcfce7; --bad: #b91c1c; --bad-wash: #fee2e2; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", sans-serif;
       color: var(--ink); background: var(--wash); }
header.top { background: #102a43; color: #fff; padding: 12px 32px; display: flex; gap: 24px; align-items: baseline; }
header.top a { color: #bcccdc; text-decoration: none; }
header.top a:hover { color: #fff; }
header.top .brand { color: #fff; font-weight: 600; font-size: 17px; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 24px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 32px 0 12px; }
p.lead { color: var(--muted); margin: 0 0 16px; }
section.card { background: var(--paper); border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; }
dl.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px 24px; margin: 0; }
dl.facts div { min-width: 0; }
dl.facts dt { color: var(--muted); font-size: 13px; }
dl.facts dd { margin: 0; font-size: 17px; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; background: var(--paper); font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-size: 13px; color: var(--muted); font-weight: 600; background: var(--wash); position: sticky; top: 0; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.mono, .nowrap { white-space: nowrap; }
td.caused-by { max-width: 300px; overflow-wrap: anywhere; }
tr:nth-child(even) td { background: #fafbfc; }
tr.failed td { background: var(--bad-wash); }
tr.after-as-of td { color: var(--muted); font-style: italic; }
.table-wrap { border: 1px solid var(--line); border-radius: 8px; overflow: auto; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px; }
.muted { color: var(--muted); font-size: 13px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 14px; }
.badge.good { color: var(--good); background: var(--good-wash); }
.badge.bad { color: var(--bad); background: var(--bad-wash); }
.badge.neutral { color: var(--muted); background: var(--wash); border: 1px solid var(--line); }
.positive { color: var(--good); }
.negative { color: var(--bad); }
figure.chart { margin: 0 0 16px; background: var(--paper); border: 1px solid var(--line); border-radius: 8px;
               padding: 12px 12px 4px; }
figure.chart figcaption { font-weight: 600; margin: 0 0 4px 8px; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart .grid line { stroke: #e4e7eb; stroke-width: 1; }
svg.chart .axis line { stroke: #9aa5b1; stroke-width: 1; }
svg.chart text { font: 12px system-ui, sans-serif; fill: #52606d; }
svg.chart text.axis-title { font-weight: 600; fill: #323f4b; }
svg.chart .area { fill: rgba(37, 99, 235, 0.10); stroke: none; }
svg.chart .series { fill: none; stroke: #2563eb; stroke-width: 2.5; stroke-linejoin: round; }
svg.chart .point { fill: #2563eb; stroke: #fff; stroke-width: 1.5; }
svg.chart .point.quiet { fill: transparent; stroke: none; }
svg.chart .point.quiet:hover { fill: #2563eb; }
form.inline { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
form.inline input { font: inherit; padding: 5px 8px; border: 1px solid var(--line); border-radius: 6px; min-width: 340px; }
form.inline button { font: inherit; padding: 5px 14px; border: 0; border-radius: 6px; background: var(--accent);
                     color: #fff; cursor: pointer; }
ul.failures { margin: 8px 0 0; padding-left: 20px; }
footer { color: var(--muted); font-size: 13px; margin-top: 32px; }
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body><header class="top"><span class="brand">Gift card ledger</span><a href="/audit">Audit overview</a></header>
<main>{body}</main></body></html>"""


def page(title: str, body: Markup, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    document = fill(_PAGE, title=title, style=Markup(_STYLE), body=body)
    return web.Response(
        status=status,
        text=document,
        content_type="text/html",
        charset="utf-8",
        headers={**SECURITY_HEADERS, **(headers or {})},
    )
