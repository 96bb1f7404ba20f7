"""The liability roll-forward of a period: per currency, what the cards owed at its start, every
movement in it, and what they owed at its end. Opening plus movements equals closing, to the
minor unit, per card (checked as each card is read) and per currency.

A period is whole UTC days, both ends inclusive: it opens at the start of its first day and
closes at the end of its last, so its closing equals ``export liabilities --as-of LAST_DAY``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from projections.exports.export_files import EXPORT_BATCH_ROWS, LedgerInconsistent, end_of_day
from projections.exports.totals import major
from projections.finance.config import FinanceConfig
from projections.finance.walk import ISSUED, LIABILITY_MOVEMENTS, SETTLED, CardFacts, Movement, walk_cards


@dataclass(frozen=True)
class Period:
    first_day: date
    last_day: date

    @property
    def start(self) -> datetime:
        return end_of_day(self.first_day - timedelta(days=1))

    @property
    def end(self) -> datetime:
        return end_of_day(self.last_day)

    def holds(self, at: datetime) -> bool:
        return self.start <= at < self.end


@dataclass
class CurrencyRollForward:
    currency: str
    opening: int = 0
    closing: int = 0
    movements: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LIABILITY_MOVEMENTS, 0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LIABILITY_MOVEMENTS, 0))
    cards_issued: int = 0
    settled: int = 0  # memo: Debits captured in the period (already out of the liability when authorised)
    held_opening: int = 0  # memo: what Debits held (authorised, not settled) at the start
    held_closing: int = 0

    def add(self, card: CardFacts, period: Period) -> None:
        self.opening += card.owed[period.start]
        self.closing += card.owed[period.end]
        self.held_opening += card.held[period.start]
        self.held_closing += card.held[period.end]
        for movement in card.movements:
            if not period.holds(movement.at):
                continue
            if movement.kind in self.movements:
                self.movements[movement.kind] += movement.change
                self.counts[movement.kind] += 1
            elif movement.kind == ISSUED:
                self.cards_issued += 1
            elif movement.kind == SETTLED:
                self.settled += movement.amount

    @property
    def moved(self) -> int:
        return sum(self.movements.values())


@dataclass
class RollForward:
    period: Period
    currencies: dict[str, CurrencyRollForward] = field(default_factory=dict)


async def roll_forward(
    pool: asyncpg.Pool,
    period: Period,
    config: FinanceConfig,
    *,
    currency: str | None = None,
    batch_rows: int = EXPORT_BATCH_ROWS,
    on_progress: Callable[[int], None] | None = None,
) -> RollForward:
    result = RollForward(period)

    def add(card: CardFacts) -> None:
        if currency is None or card.currency == currency:
            _check_card_adds_up(card, period)
            if _touches(card, period):
                result.currencies.setdefault(card.currency, CurrencyRollForward(card.currency)).add(card, period)

    await walk_cards(pool, [period.start, period.end], config, add, batch_rows=batch_rows, on_progress=on_progress)
    for rolled in result.currencies.values():
        if rolled.opening + rolled.moved != rolled.closing:  # cannot happen when every card adds up: asserted twice
            raise LedgerInconsistent(f"{rolled.currency}: opening + movements != closing; run giftcard audit verify")
    return result


def _touches(card: CardFacts, period: Period) -> bool:
    """Owed something at either end, or did something in between."""
    return bool(card.owed[period.start] or card.owed[period.end] or any(period.holds(m.at) for m in card.movements))


def _check_card_adds_up(card: CardFacts, period: Period) -> None:
    moved = card.changes_between(period.start, period.end)
    if card.owed[period.start] + moved != card.owed[period.end]:
        raise LedgerInconsistent(
            f"card {card.card_id}: owed {card.owed[period.start]} at {period.start.isoformat()}, moved {moved}, "
            f"owed {card.owed[period.end]} at {period.end.isoformat()} (minor units); run giftcard audit verify"
        )


def render_roll_forward(result: RollForward) -> dict[str, Any]:
    """Amounts exact, in major units; a movement that lowers the liability is negative."""
    period = result.period
    return {
        "from": period.first_day.isoformat(),
        "to": period.last_day.isoformat(),
        "opensAt": period.start.isoformat(),
        "closesAt": period.end.isoformat(),
        "currencies": [_render_currency(rolled) for _, rolled in sorted(result.currencies.items())],
    }


def _render_currency(rolled: CurrencyRollForward) -> dict[str, Any]:
    def money(units: int) -> Any:
        return major(units, rolled.currency)

    return {
        "currency": rolled.currency,
        "opening": money(rolled.opening),
        "movements": [
            {"movement": kind, "count": rolled.counts[kind], "amount": money(rolled.movements[kind])}
            for kind in LIABILITY_MOVEMENTS
        ],
        "closing": money(rolled.closing),
        "memo": {
            "cardsIssued": rolled.cards_issued,
            "settled": money(rolled.settled),
            "heldAtOpening": money(rolled.held_opening),
            "heldAtClosing": money(rolled.held_closing),
        },
    }


ROLL_FORWARD_CSV_COLUMNS = ["currency", "line", "count", "amount"]


def write_roll_forward_csv(result: RollForward, path: Path) -> None:
    """One row per currency and line: opening, each movement, closing, then the memo lines."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(ROLL_FORWARD_CSV_COLUMNS)
        for rendered in render_roll_forward(result)["currencies"]:
            currency = rendered["currency"]
            writer.writerow([currency, "opening", "", rendered["opening"]])
            for line in rendered["movements"]:
                writer.writerow([currency, line["movement"], line["count"], line["amount"]])
            writer.writerow([currency, "closing", "", rendered["closing"]])
            memo = rendered["memo"]
            writer.writerow([currency, "memo_cards_issued", memo["cardsIssued"], ""])
            for name in ("settled", "heldAtOpening", "heldAtClosing"):
                writer.writerow([currency, f"memo_{name}", "", memo[name]])


class MovementRow(msgspec.Struct, frozen=True):
    card_id: str
    currency: str
    movement: Movement


@dataclass
class MovementsBehind:
    """The movements of one kind, currency and period that make one roll-forward figure."""

    rows: list[MovementRow] = field(default_factory=list)  # the first ``rows_max``, in card order
    count: int = 0
    total: int = 0  # minor units, signed as in the roll-forward


async def movements_behind(
    pool: asyncpg.Pool,
    period: Period,
    config: FinanceConfig,
    currency: str,
    kind: str,
    *,
    rows_max: int,
    batch_rows: int = EXPORT_BATCH_ROWS,
) -> MovementsBehind:
    found = MovementsBehind()

    def add(card: CardFacts) -> None:
        if card.currency != currency:
            return
        for movement in card.movements:
            if movement.kind == kind and period.holds(movement.at):
                found.count += 1
                found.total += movement.change
                if len(found.rows) < rows_max:
                    found.rows.append(MovementRow(card.card_id, card.currency, movement))

    await walk_cards(pool, [], config, add, batch_rows=batch_rows)
    return found
