"""Double-entry journal lines for a period: one entry per movement of the liability, two lines each
(one debit, one credit, same amount), so every entry balances and so does the file.

The accounts, by key (renamed in the finance configuration's ``[accounts]``):

=============================  ========================  ========================
movement                       debit                     credit
=============================  ========================  ========================
loaded (a Credit)              cash                      liability
load_cancelled                 liability                 cash
redeemed (a Debit)             liability                 redemptions
redemption_released/refunded   redemptions               liability
expired_to_breakage            liability                 breakage
expired_to_unclaimed_property  liability                 unclaimed_property
=============================  ========================  ========================

A movement that runs the other way (a Credit cancelled on a card that had already expired takes
back value recognised as breakage) swaps the two sides. Settlements move nothing owed and make no
entry: the Debit's authorisation already did.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg
import msgspec

from projections.exports.export_files import EXPORT_BATCH_ROWS
from projections.exports.totals import major
from projections.finance.config import BREAKAGE, CASH, LIABILITY, REDEMPTIONS, UNCLAIMED_PROPERTY, FinanceConfig
from projections.finance.rollforward import Period
from projections.finance.walk import (
    EXPIRED_TO,
    LOAD_CANCELLED,
    LOADED,
    REDEEMED,
    REDEMPTION_REFUNDED,
    REDEMPTION_RELEASED,
    CardFacts,
    Movement,
    walk_cards,
)

JOURNAL_FORMATS = ("csv", "jsonl")
JOURNAL_COLUMNS = [
    "entry_id",
    "date",
    "account",
    "debit",
    "credit",
    "currency",
    "card_id",
    "event_position",
    "event_version",
    "transaction_id",
    "movement",
]

# The account on the other side of the liability, for each movement.
COUNTER_ACCOUNT = {
    LOADED: CASH,
    LOAD_CANCELLED: CASH,
    REDEEMED: REDEMPTIONS,
    REDEMPTION_RELEASED: REDEMPTIONS,
    REDEMPTION_REFUNDED: REDEMPTIONS,
    EXPIRED_TO[BREAKAGE]: BREAKAGE,
    EXPIRED_TO[UNCLAIMED_PROPERTY]: UNCLAIMED_PROPERTY,
}


@dataclass
class JournalResult:
    entries: int = 0
    lines: int = 0
    debits: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per currency, minor units
    credits: dict[str, int] = field(default_factory=lambda: defaultdict(int))


async def write_journal(
    pool: asyncpg.Pool,
    period: Period,
    config: FinanceConfig,
    output: Path,
    file_format: str,
    *,
    batch_rows: int = EXPORT_BATCH_ROWS,
    on_progress: Callable[[int], None] | None = None,
) -> JournalResult:
    """Writes the period's entries to ``output`` (through ``output.partial``, renamed when complete)."""
    if file_format not in JOURNAL_FORMATS:
        raise ValueError(f"format must be one of {', '.join(JOURNAL_FORMATS)}; got {file_format!r}")
    partial = output.with_name(output.name + ".partial")
    result = JournalResult()
    try:
        with partial.open("w", newline="", encoding="utf-8") as file:
            write_lines = _csv_lines(file) if file_format == "csv" else _jsonl_lines(file)

            def write(card: CardFacts) -> None:
                for movement in card.movements:
                    if movement.change and period.holds(movement.at):
                        lines = entry_lines(card, movement, config)
                        write_lines(lines)
                        _add_up(result, lines, abs(movement.change), card.currency)

            await walk_cards(pool, [], config, write, batch_rows=batch_rows, on_progress=on_progress)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)
    return result


def entry_lines(card: CardFacts, movement: Movement, config: FinanceConfig) -> list[tuple[Any, ...]]:
    """The two lines of the movement's entry, values in ``JOURNAL_COLUMNS`` order: amounts exact in major
    units, the other side None. Tuples, not dicts: a journal of a large ledger has millions of lines."""
    counter = config.account(COUNTER_ACCOUNT[movement.kind])
    liability = config.account(LIABILITY)
    debit_account, credit_account = (counter, liability) if movement.change > 0 else (liability, counter)
    amount = major(abs(movement.change), card.currency)
    entry_id, date = f"{movement.position}-{movement.kind}", movement.at.isoformat()
    tail = (card.currency, card.card_id, movement.position, movement.version, movement.transaction_id, movement.kind)
    return [(entry_id, date, debit_account, amount, None, *tail), (entry_id, date, credit_account, None, amount, *tail)]


def _add_up(result: JournalResult, lines: list[tuple[Any, ...]], units: int, currency: str) -> None:
    result.entries += 1
    result.lines += len(lines)
    result.debits[currency] += units
    result.credits[currency] += units


def _csv_lines(file: IO[str]) -> Callable[[list[tuple[Any, ...]]], None]:
    writer = csv.writer(file)
    writer.writerow(JOURNAL_COLUMNS)
    return writer.writerows  # None is written as an empty field, a Decimal exactly


_jsonl = msgspec.json.Encoder(decimal_format="string")  # exact decimals, never floats


def _jsonl_lines(file: IO[str]) -> Callable[[list[tuple[Any, ...]]], None]:
    def write(lines: list[tuple[Any, ...]]) -> None:
        file.write(
            "".join(_jsonl.encode(dict(zip(JOURNAL_COLUMNS, line, strict=True))).decode() + "\n" for line in lines)
        )

    return write


def render_journal(result: JournalResult, output: Path, file_format: str) -> dict[str, Any]:
    return {
        "output": str(output),
        "format": file_format,
        "entries": result.entries,
        "lines": result.lines,
        "totals": [
            {"currency": c, "debit": major(result.debits[c], c), "credit": major(result.credits[c], c)}
            for c in sorted(result.debits)
        ],
    }
