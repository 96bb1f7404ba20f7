"""The totals finance reconciles: count and exact sum per provider, currency, kind and direction.

``export transactions`` adds up the rows it writes; ``audit verify`` adds up what the domain
replay moved; the two must be equal. Sums are kept in integer units (minor units of the
currency; 10^-4 for an external provider's amounts, whose currency the hub does not record),
so no decimal context can ever round them.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any, NamedTuple

from ledger.domain.giftcard import CREDIT, DEBIT
from ledger.domain.money import to_major
from projections import events as ev
from projections.audit.replay import CANCELLATION, TRANSACTION


class TotalKey(NamedTuple):
    provider: str
    currency: str | None  # None: an external provider's amount, in 10^-4 units
    kind: str  # transaction, settlement, cancellation
    operation: str | None  # Credit, Debit; of a settlement or cancellation: its transaction's; None: not recorded


def major(units: int, currency: str | None) -> Decimal:
    """Integer units as an exact major-unit decimal (an unknown currency's units are 10^-4)."""
    if currency is not None:
        return to_major(units, currency)
    exact = Decimal(units).scaleb(-ev.UNKNOWN_CURRENCY_EXPONENT)
    return exact.quantize(Decimal(1)) if exact == exact.to_integral_value() else exact.normalize()


class Totals:
    def __init__(self) -> None:
        self._counts: defaultdict[TotalKey, int] = defaultdict(int)
        self._units: defaultdict[TotalKey, int] = defaultdict(int)

    def add(self, key: TotalKey, units: int) -> None:
        self.add_many(key, 1, units)

    def add_many(self, key: TotalKey, count: int, units: int) -> None:
        """``count`` amounts already summed to ``units`` (a group the database added up)."""
        self._counts[key] += count
        self._units[key] += units

    def add_totals(self, other: Totals) -> None:
        for key in other._counts:
            self.add_many(key, other._counts[key], other._units[key])

    def sorted_keys(self) -> list[TotalKey]:
        return sorted(self._counts, key=lambda k: (k.provider, k.currency or "", k.kind, k.operation or ""))

    def count(self, key: TotalKey) -> int:
        return self._counts.get(key, 0)

    def units(self, key: TotalKey) -> int:
        return self._units.get(key, 0)

    def balance_change(self, provider: str) -> dict[str, int]:
        """Per currency, what the provider's native cards hold as a result (minor units): Credits less
        Debits, plus cancelled Debits, less cancelled Credits. Reconciles to the liabilities."""
        sign = {
            (TRANSACTION, CREDIT): 1,
            (TRANSACTION, DEBIT): -1,
            (CANCELLATION, DEBIT): 1,
            (CANCELLATION, CREDIT): -1,
        }
        change: defaultdict[str, int] = defaultdict(int)
        for key, units in self._units.items():
            factor = sign.get((key.kind, key.operation), 0)
            if key.provider == provider and key.currency is not None and factor:
                change[key.currency] += factor * units
        return dict(sorted(change.items()))

    def render(self) -> list[dict[str, Any]]:
        return [
            {
                "provider": key.provider,
                "currency": key.currency,
                "kind": key.kind,
                "operation": key.operation,
                "count": self._counts[key],
                "amount": major(self._units[key], key.currency),
            }
            for key in self.sorted_keys()
        ]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Totals):
            return NotImplemented
        return dict(self._counts) == dict(other._counts) and dict(self._units) == dict(other._units)

    def __repr__(self) -> str:
        return f"Totals({self.render()!r})"
