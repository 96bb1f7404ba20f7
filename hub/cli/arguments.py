"""The argument types the commands share: argparse turns their ``ArgumentTypeError`` into a usage
error (exit 2) that names the option, before any command touches the database."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation

from ledger.domain.errors import DomainError
from ledger.domain.money import exponent_of
from ledger.postgres.tenancy import ACCOUNT, is_account


def instant(value: str) -> datetime:
    """An ISO 8601 date or instant; a naive one is UTC, as the ledger's clock is."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or instant: {value!r}") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date like 2026-01-31: {value!r}") from None


def currency(value: str) -> str:
    try:
        exponent_of(value)
    except DomainError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def account(value: str) -> str:
    """A tenant: a VTEX account name."""
    if not is_account(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a VTEX account name ({ACCOUNT.pattern})")
    return value


def amount(value: str) -> Decimal:
    try:
        parsed = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount: {value!r}") from None
    if not parsed.is_finite() or parsed < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value!r}")
    return parsed


def add_tenant_filter(parser: argparse.ArgumentParser, what: str) -> None:
    """``--tenant ACCOUNT``: ``what`` the command does with that one store; without it, every store."""
    parser.add_argument("--tenant", type=account, metavar="ACCOUNT", help=f"{what}; default: every store")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def add_batch_size(parser: argparse.ArgumentParser, flag: str, default: int, what: str) -> None:
    """How much one step of a long walk takes: bounds its memory and its transaction, not its result."""
    parser.add_argument(flag, type=positive_int, default=default, help=f"{what} (default {default})")


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    return _bounded(int, "a whole number", low, high)


def bounded_float(low: float, high: float) -> Callable[[str], float]:
    return _bounded(float, "a number", low, high)


def _bounded(kind: Callable[[str], float], what: str, low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {number}")
        return number

    return parse
