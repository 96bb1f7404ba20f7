"""Read models derived from the events, and the runner that keeps them current.

Each read model is a projection with its own checkpoint (see ``projections.runner``):

- ``card_balances``: every native card's balance, holds, settlements, credits and debits;
- ``transaction_history``: every transaction with its settlements and cancellations;
- ``daily_totals``: flows per day, currency and provider, and the outstanding liability.
"""

from __future__ import annotations

from projections.models.card_balances import CardBalances
from projections.models.daily_totals import DailyTotals
from projections.models.transaction_history import TransactionHistory
from projections.projection import Projection


def read_models(native_provider_id: str) -> list[Projection]:
    """Every projection the service keeps, each named for its read model."""
    return [CardBalances(), TransactionHistory(native_provider_id), DailyTotals(native_provider_id)]


def names() -> list[str]:
    return [CardBalances.name, TransactionHistory.name, DailyTotals.name]


def read_model(name: str, native_provider_id: str) -> Projection:
    found = {p.name: p for p in read_models(native_provider_id)}
    try:
        return found[name]
    except KeyError:
        raise LookupError(f"no projection named {name!r}; known: {', '.join(sorted(found))}") from None
