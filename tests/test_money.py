from decimal import Decimal

import pytest

from ledger.domain.errors import InvalidAmount, UnknownCurrency
from ledger.domain.money import AMOUNT_MINOR_MAX, to_major, to_minor


@pytest.mark.parametrize(
    ("value", "currency", "minor"),
    [("140.0", "USD", 14000), ("5.92", "USD", 592), ("500", "JPY", 500), ("1.234", "BHD", 1234), (7, "BRL", 700)],
)
def test_exact_major_amounts_become_minor_units(value, currency, minor):
    assert to_minor(Decimal(value) if isinstance(value, str) else value, currency) == minor


@pytest.mark.parametrize(
    ("value", "currency", "why"),
    [
        ("0.001", "USD", "more decimals"),
        ("1.5", "JPY", "more decimals"),
        ("0", "USD", "greater than zero"),
        ("-5", "USD", "greater than zero"),
        ("NaN", "USD", "finite"),
        ("Infinity", "USD", "finite"),
        ("1e40", "USD", "too large"),
        (str(AMOUNT_MINOR_MAX), "USD", "exceeds"),
        ("abc", "USD", "must be a number"),
    ],
)
def test_inexact_or_absurd_amounts_are_refused(value, currency, why):
    with pytest.raises(InvalidAmount, match=why):
        to_minor(value, currency)


def test_unknown_currency_is_refused_rather_than_guessed():
    with pytest.raises(UnknownCurrency):
        to_minor(Decimal("1"), "XYZ")


def test_minor_units_back_to_major_keep_the_currency_decimals():
    assert to_major(592, "USD") == Decimal("5.92")
    assert str(to_major(14000, "USD")) == "140.00"
    assert to_major(1234, "BHD") == Decimal("1.234")
    assert to_major(500, "JPY") == Decimal("500")
