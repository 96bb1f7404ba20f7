"""Breakage: the value of gift cards that will never be redeemed (ASC 606-10-55-46..49, IFRS 15
B44-B47), estimated from the ledger's own history.

The rate: of the value loaded (net of cancelled loads) onto cards that have expired by the end of
``as_of``, the share left on them when they expired. By issue cohort (the UTC month a card was
issued), per currency:

- ``remote``: breakage is recognised only when redemption becomes remote, i.e. at expiry; the
  amount recognised is what expired (the roll-forward's ``expired_to_breakage``).
- ``proportional`` (the default): for cards not yet expired, the expected breakage (loaded x rate)
  is recognised in proportion to the value redeemed so far, ``expected x redeemed / (loaded -
  expected)`` (at most ``expected``), rounded half-even to the minor unit per cohort; plus what
  expired. Every input is in the report, so an auditor can recompute each figure.

A currency whose expired value goes to unclaimed property (see ``config``) recognises none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import asyncpg

from projections.exports.export_files import EXPORT_BATCH_ROWS, end_of_day
from projections.exports.totals import major
from projections.finance.config import BREAKAGE, FinanceConfig
from projections.finance.walk import (
    EXPIRED_TO,
    LOAD_CANCELLED,
    LOADED,
    REDEEMED,
    REDEMPTION_REFUNDED,
    REDEMPTION_RELEASED,
    CardFacts,
    walk_cards,
)

PROPORTIONAL = "proportional"
REMOTE = "remote"
METHODS = (PROPORTIONAL, REMOTE)
RATE_DECIMALS = 6  # the rate as reported and used: exact to a millionth


@dataclass
class Cohort:
    """Cards of one currency issued in one month, split into those expired by ``as_of`` and the rest."""

    cards: int = 0
    loaded: int = 0  # minor units, net of cancelled loads
    redeemed: int = 0  # net of released and refunded redemptions
    expired_cards: int = 0
    expired_loaded: int = 0
    expired_value: int = 0  # left on the expired cards when they expired (or after: released later)
    open_loaded: int = 0  # of the cards not expired
    open_redeemed: int = 0


@dataclass
class BreakageResult:
    as_of: date
    method: str
    config: FinanceConfig  # whose expiry policy says which currencies recognise breakage
    cohorts: dict[str, dict[str, Cohort]] = field(default_factory=dict)  # currency -> "YYYY-MM" -> cohort


async def estimate_breakage(
    pool: asyncpg.Pool,
    as_of: date,
    method: str,
    config: FinanceConfig,
    *,
    batch_rows: int = EXPORT_BATCH_ROWS,
    on_progress: Callable[[int], None] | None = None,
) -> BreakageResult:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    cutoff = end_of_day(as_of)
    result = BreakageResult(as_of, method, config)

    def add(card: CardFacts) -> None:
        if card.issued_at >= cutoff:
            return
        cohort = result.cohorts.setdefault(card.currency, {}).setdefault(card.issued_at.strftime("%Y-%m"), Cohort())
        _add_card(cohort, card, cutoff)

    await walk_cards(pool, [cutoff], config, add, batch_rows=batch_rows, on_progress=on_progress)
    return result


def _add_card(cohort: Cohort, card: CardFacts, cutoff: datetime) -> None:
    moved = {kind: 0 for kind in (LOADED, LOAD_CANCELLED, REDEEMED, REDEMPTION_RELEASED, REDEMPTION_REFUNDED)}
    expired = 0
    for movement in card.movements:
        if movement.at >= cutoff:
            continue
        if movement.kind in moved:
            moved[movement.kind] += movement.change
        elif movement.kind in EXPIRED_TO.values():
            expired -= movement.change
    loaded = moved[LOADED] + moved[LOAD_CANCELLED]
    redeemed = -(moved[REDEEMED] + moved[REDEMPTION_RELEASED] + moved[REDEMPTION_REFUNDED])
    cohort.cards += 1
    cohort.loaded += loaded
    cohort.redeemed += redeemed
    if card.expiring_date < cutoff:
        cohort.expired_cards += 1
        cohort.expired_loaded += loaded
        cohort.expired_value += expired
    else:
        cohort.open_loaded += loaded
        cohort.open_redeemed += redeemed


def breakage_rate(cohorts: dict[str, Cohort]) -> Decimal:
    """Value left at expiry over value loaded, over every expired card of the currency; 0 with none."""
    loaded = sum(c.expired_loaded for c in cohorts.values())
    left = sum(c.expired_value for c in cohorts.values())
    if loaded <= 0:
        return Decimal(0)
    return (Decimal(left) / Decimal(loaded)).quantize(Decimal(1).scaleb(-RATE_DECIMALS), ROUND_HALF_EVEN)


def recognised_on_open_cards(cohort: Cohort, rate: Decimal) -> tuple[int, int]:
    """(expected breakage, recognised to date) of the cohort's cards not yet expired, minor units."""
    expected = int((cohort.open_loaded * rate).to_integral_value(ROUND_HALF_EVEN))
    expected_redemptions = cohort.open_loaded - expected
    if expected <= 0 or expected_redemptions <= 0:
        return max(expected, 0), 0
    share = min(Decimal(1), Decimal(max(cohort.open_redeemed, 0)) / Decimal(expected_redemptions))
    return expected, int((expected * share).to_integral_value(ROUND_HALF_EVEN))


def render_breakage(result: BreakageResult) -> dict[str, Any]:
    config = result.config
    currencies = []
    for currency, cohorts in sorted(result.cohorts.items()):
        recognises = config.expiry_destination(currency) == BREAKAGE
        rate = breakage_rate(cohorts)
        rows, total = [], 0
        for month, cohort in sorted(cohorts.items()):
            expected, on_open = recognised_on_open_cards(cohort, rate)
            if result.method == REMOTE or not recognises:
                expected, on_open = 0, 0
            recognised = on_open + (cohort.expired_value if recognises else 0)
            total += recognised
            rows.append(_render_cohort(month, cohort, currency, expected, on_open, recognised))
        currencies.append(
            {
                "currency": currency,
                "expiryPolicy": config.expiry_destination(currency),
                "rate": rate,
                "rateInputs": {
                    "expiredCards": sum(c.expired_cards for c in cohorts.values()),
                    "loadedOnExpiredCards": major(sum(c.expired_loaded for c in cohorts.values()), currency),
                    "leftAtExpiry": major(sum(c.expired_value for c in cohorts.values()), currency),
                },
                "recognisedToDate": major(total, currency),
                "cohorts": rows,
            }
        )
    return {"asOf": result.as_of.isoformat(), "method": result.method, "currencies": currencies}


def _render_cohort(
    month: str, cohort: Cohort, currency: str, expected: int, on_open: int, recognised: int
) -> dict[str, Any]:
    return {
        "issued": month,
        "cards": cohort.cards,
        "loaded": major(cohort.loaded, currency),
        "redeemed": major(cohort.redeemed, currency),
        "expiredCards": cohort.expired_cards,
        "leftAtExpiry": major(cohort.expired_value, currency),
        "openLoaded": major(cohort.open_loaded, currency),
        "openRedeemed": major(cohort.open_redeemed, currency),
        "expectedBreakageOnOpen": major(expected, currency),
        "recognisedOnOpen": major(on_open, currency),
        "recognised": major(recognised, currency),
    }
