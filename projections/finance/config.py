"""The finance configuration: where an expired card's value goes, and the chart of accounts.

A TOML file named by ``GIFTCARD_FINANCE_CONFIG`` (none: the defaults below)::

    [expiry]
    default = "breakage"                 # or "unclaimed_property"
    currencies = { BRL = "unclaimed_property" }

    [accounts]
    cash = "1000 Cash and receivables"
    liability = "2300 Gift card liability"

Where the standards leave the choice (ASC 606-10-55-48, IFRS 15 B46: breakage is revenue unless
law says the value must be remitted to a state), the default is breakage; a currency can be sent
to the unclaimed property payable instead.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.domain.money import CURRENCY_EXPONENTS

CONFIG_ENV = "GIFTCARD_FINANCE_CONFIG"

BREAKAGE = "breakage"
UNCLAIMED_PROPERTY = "unclaimed_property"
EXPIRY_DESTINATIONS = (BREAKAGE, UNCLAIMED_PROPERTY)

# The accounts a journal line can name, and what each is called unless the file renames it.
CASH = "cash"
LIABILITY = "liability"
REDEMPTIONS = "redemptions"
DEFAULT_ACCOUNTS = {
    CASH: "Cash or receivable",
    LIABILITY: "Gift card liability",
    REDEMPTIONS: "Gift card redemptions (sales clearing)",
    BREAKAGE: "Breakage revenue",
    UNCLAIMED_PROPERTY: "Unclaimed property payable",
}
_SECTIONS = {"expiry", "accounts"}
_NAME_CHARS_MAX = 200


class FinanceConfigError(Exception):
    """The configuration file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class FinanceConfig:
    expiry_default: str = BREAKAGE
    expiry_by_currency: dict[str, str] = field(default_factory=dict)
    accounts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ACCOUNTS))

    def expiry_destination(self, currency: str) -> str:
        """``breakage`` or ``unclaimed_property``: where a card of ``currency`` that expires with value goes."""
        return self.expiry_by_currency.get(currency, self.expiry_default)

    def account(self, key: str) -> str:
        return self.accounts[key]


def finance_config_at(path: str | None) -> FinanceConfig:
    """The configuration in the file ``GIFTCARD_FINANCE_CONFIG`` names, or the defaults without one."""
    return FinanceConfig() if not path else load_finance_config(Path(path))


def load_finance_config(path: Path) -> FinanceConfig:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FinanceConfigError(f"{CONFIG_ENV}: cannot read {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FinanceConfigError(f"{CONFIG_ENV}: {path} is not TOML: {e}") from None
    return parse_finance_config(document, str(path))


def parse_finance_config(document: dict[str, Any], where: str) -> FinanceConfig:
    _refuse_unknown(document, _SECTIONS, where, "")
    expiry = _table(document, "expiry", where)
    accounts = _table(document, "accounts", where)
    _refuse_unknown(expiry, {"default", "currencies"}, where, "expiry.")
    _refuse_unknown(accounts, set(DEFAULT_ACCOUNTS), where, "accounts.")
    default = _destination(expiry.get("default", BREAKAGE), where, "expiry.default")
    by_currency = {}
    for currency, destination in _table(expiry, "currencies", where, "expiry.").items():
        if currency not in CURRENCY_EXPONENTS:
            raise FinanceConfigError(f"{where}: expiry.currencies.{currency} is not a supported ISO 4217 currency")
        by_currency[currency] = _destination(destination, where, f"expiry.currencies.{currency}")
    names = dict(DEFAULT_ACCOUNTS)
    for key, name in accounts.items():
        if not isinstance(name, str) or not name.strip() or len(name) > _NAME_CHARS_MAX:
            raise FinanceConfigError(f"{where}: accounts.{key} must be a name of 1 to {_NAME_CHARS_MAX} characters")
        names[key] = name.strip()
    return FinanceConfig(default, by_currency, names)


def _table(document: dict[str, Any], key: str, where: str, prefix: str = "") -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise FinanceConfigError(f"{where}: {prefix}{key} must be a table")
    return value


def _refuse_unknown(table: dict[str, Any], known: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise FinanceConfigError(
            f"{where}: unknown key {prefix}{unknown[0]} (expected one of {', '.join(sorted(known))})"
        )


def _destination(value: object, where: str, key: str) -> str:
    if value not in EXPIRY_DESTINATIONS:
        raise FinanceConfigError(f"{where}: {key} must be one of {', '.join(EXPIRY_DESTINATIONS)}, got {value!r}")
    return str(value)
