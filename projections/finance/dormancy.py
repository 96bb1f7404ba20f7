"""Dormant cards, for unclaimed-property reports: cards that owe something at the end of a day and
on which no shopper has done anything for N years.

Shopper-initiated activity is a Credit (a load) or a Debit (a redemption); settlements and
cancellations are the store processing an order already placed, and a void is the ledger's own
sweep, so neither resets the clock. A card never used dates from its issue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime

import asyncpg
import msgspec

from projections.exports.export_files import EXPORT_BATCH_ROWS, end_of_day
from projections.finance.config import FinanceConfig
from projections.finance.walk import SHOPPER_ACTIVITY, CardFacts, walk_cards


class DormantCard(msgspec.Struct, frozen=True):
    card_id: str
    currency: str
    owed: int  # minor units, at the end of the day
    last_activity_at: datetime
    issued_at: datetime
    expiring_date: datetime


DORMANT_COLUMNS = list(DormantCard.__struct_fields__)


@dataclass
class DormancyResult:
    as_of: date
    years: int
    cutoff: datetime  # the end of ``as_of``
    quiet_since: datetime  # activity before this instant only: dormant
    cards: dict[str, int] = field(default_factory=dict)  # per currency
    owed: dict[str, int] = field(default_factory=dict)


def years_before(moment: datetime, years: int) -> datetime:
    """The same instant ``years`` calendar years earlier (29 February: the 28th)."""
    try:
        return moment.replace(year=moment.year - years)
    except ValueError:
        return moment.replace(year=moment.year - years, day=28)


async def dormant_cards(
    pool: asyncpg.Pool,
    as_of: date,
    years: int,
    config: FinanceConfig,
    on_dormant: Callable[[DormantCard], None],
    *,
    batch_rows: int = EXPORT_BATCH_ROWS,
    on_progress: Callable[[int], None] | None = None,
) -> DormancyResult:
    cutoff = end_of_day(as_of)
    result = DormancyResult(as_of, years, cutoff, years_before(cutoff, years))

    def check(card: CardFacts) -> None:
        owed = card.owed[cutoff]
        last = last_activity_at(card, cutoff)
        if owed and last < result.quiet_since:
            result.cards[card.currency] = result.cards.get(card.currency, 0) + 1
            result.owed[card.currency] = result.owed.get(card.currency, 0) + owed
            on_dormant(DormantCard(card.card_id, card.currency, owed, last, card.issued_at, card.expiring_date))

    await walk_cards(pool, [cutoff], config, check, batch_rows=batch_rows, on_progress=on_progress)
    return result


def last_activity_at(card: CardFacts, before: datetime) -> datetime:
    times = [m.at for m in card.movements if m.kind in SHOPPER_ACTIVITY and m.at < before]
    return max(times, default=card.issued_at)
