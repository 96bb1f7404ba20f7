"""Server-rendered HTML (the auditor's pages): one Jinja2 environment over the files in ``hub/pages/templates``.

Every template autoescapes, so a value that comes from data (a caption, a request id) prints as text;
only what a template itself writes, or a macro it calls, is markup. A variable a template names but
was not given is an error (``StrictUndefined``), not an empty string on a page an auditor trusts.

The pages carry no script at all, and their Content-Security-Policy says so: even a value that
escaped escaping could not run.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import jinja2
import markupsafe
from aiohttp import web

from ledger.domain.money import to_major
from projections import events as ev

TEMPLATES_DIR = Path(__file__).parent / "templates"

# No script, no fetch, no frame: inline styles and inline SVG are all a page uses.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # what an auditor sees is the ledger's money: never kept by a shared cache
}


# ---- numbers and times, as people read them --------------------------------------------------


def decimal_text(value: Decimal | int, *, signed: bool = False) -> str:
    """An exact decimal with thousands grouped (``1,234.50``); ``signed`` adds ``+`` to a positive.

    ASCII ``-``, not a typographic minus, so a figure copied into a spreadsheet stays a number.
    """
    text = f"{value:,}"
    return f"+{text}" if signed and value > 0 else text


def amount_text(minor: int, currency: str, *, signed: bool = False) -> str:
    return decimal_text(to_major(minor, currency), signed=signed)


def count_text(number: int) -> str:
    """A count with thousands grouped: ``12,345``."""
    return f"{number:,}"


def instant_text(moment: datetime) -> str:
    """``2026-01-15 12:00:00`` (UTC, the zone every page states in its headings)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def written_instant_text(value: str | None) -> str:
    """An instant as an event wrote it (an ISO 8601 string), shown as ``instant_text`` shows one."""
    if not value:
        return "unknown"
    try:
        return instant_text(ev.instant(value))
    except ValueError:
        return value  # an altered event: shown as it was written


# ---- the environment ---------------------------------------------------------------------------


def escaped(value: object) -> markupsafe.Markup:
    """Each ``{{ value }}``, escaped as ``html.escape`` does (``&quot;``, ``&#x27;``) rather than as
    markupsafe would (``&#34;``, ``&#39;``): the pages keep the entities they printed before Jinja, which
    tests look for in the served HTML. Markup (a macro's output) passes as it is; None prints as nothing,
    as an absent optional field should."""
    if hasattr(value, "__html__"):
        return markupsafe.Markup(value.__html__())
    return markupsafe.Markup(html.escape("" if value is None else str(value), quote=True))


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every template, whatever its file name ends with
        undefined=jinja2.StrictUndefined,
        finalize=escaped,
        trim_blocks=True,  # templates are laid out for people; the pages need none of that whitespace
        lstrip_blocks=True,
    )
    environment.filters.update(
        amount=amount_text,
        decimal=decimal_text,
        instant=instant_text,
        written_instant=written_instant_text,
        count=count_text,
    )
    return environment


ENVIRONMENT = _environment()


def render(template: str, **context: object) -> str:
    return ENVIRONMENT.get_template(template).render(**context)


def html_response(template: str, *, status: int = 200, **context: object) -> web.Response:
    return web.Response(
        status=status,
        text=render(template, **context),
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )
