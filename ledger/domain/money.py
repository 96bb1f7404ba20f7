"""Money: integer minor units inside, exact decimals at the edges.

Amounts travel on the wire as JSON numbers in major units (``140.0``, ``5.92``),
as the VTEX specs do. Inside the ledger every amount is an ``int`` of minor units
for the card's currency, so no rounding ever happens: a value the currency cannot
represent exactly is refused, not rounded.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from ledger.domain.errors import InvalidAmount, UnknownCurrency

# ISO 4217 minor-unit exponents. Currencies not listed here are refused rather
# than guessed, because a wrong exponent silently multiplies money by 10 or 100.
CURRENCY_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(
        "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BTN "
        "BWP BYN BZD CAD CDF CHF CNY COP CRC CUP CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP "
        "GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW "
        "KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR "
        "MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR "
        "SDG SEK SGD SHP SLE SOS SRD SSP STN SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH "
        "USD UYU UZS VES WST XCD YER ZAR ZMW ZWL".split(),  # noqa: SIM905 (a table reads better as text)
        2,
    ),
    **dict.fromkeys("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0),  # noqa: SIM905
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),  # noqa: SIM905
    **dict.fromkeys("CLF UYW".split(), 4),  # noqa: SIM905
}

# No gift card holds more than this many minor units: far above any real card,
# far below the 64-bit columns and JSON numbers that carry it.
AMOUNT_MINOR_MAX = 10**15


def exponent_of(currency: str) -> int:
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise UnknownCurrency(f"currencyCode {currency!r} is not an ISO 4217 currency this ledger supports") from None


def to_minor(value: Decimal | int | str, currency: str, *, field: str = "value") -> int:
    """Converts a positive major-unit amount to minor units, refusing anything inexact."""
    exponent = exponent_of(currency)
    try:
        amount = value if isinstance(value, Decimal) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise InvalidAmount(f"{field} must be a number, got {value!r}") from None
    if not amount.is_finite():
        raise InvalidAmount(f"{field} must be a finite number, got {amount}")
    if amount <= 0:
        raise InvalidAmount(f"{field} must be greater than zero, got {amount}")
    if amount.adjusted() > 30:
        raise InvalidAmount(f"{field} is too large: {amount:.3e}")
    scaled = amount.scaleb(exponent)
    if scaled != scaled.to_integral_value():
        raise InvalidAmount(f"{field} {amount} has more decimals than {currency} allows ({exponent})")
    minor = int(scaled)
    if minor > AMOUNT_MINOR_MAX:
        raise InvalidAmount(f"{field} {amount} exceeds the largest amount a card may hold")
    return minor


def to_major(minor: int, currency: str) -> Decimal:
    """Minor units back to an exact major-unit Decimal with the currency's decimals."""
    return Decimal(minor).scaleb(-exponent_of(currency))
