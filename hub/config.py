"""Settings: every ``GIFTCARD_*`` environment variable, read and checked here and nowhere else.

Each is a typed field with its range (``msgspec.Meta``); the README's Configuration table lists
them all. ``Settings.from_env`` refuses a value that is not of its type or out of its range with
``SettingRefused``, one line naming the variable, the value and what is allowed, which the command
line prints before it starts anything (exit 2, no traceback). An empty variable counts as unset.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from hub.public_address import parse_public_url, parse_trusted_proxies
from ledger.domain.errors import DomainError
from ledger.domain.money import exponent_of
from ledger.postgres.database import REQUEST_STATEMENT_TIMEOUT_S, Database, shown_url
from ledger.postgres.tenancy import DEFAULT_TENANT

PREFIX = "GIFTCARD_"
_DOMAIN = r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
DAY_S = 86_400.0
HOUR_S = 3_600.0


def seconds(*, gt: float | None = None, ge: float | None = None, le: float) -> Any:
    return Annotated[float, Meta(gt=gt, ge=ge, le=le, description="a number of seconds")]


def whole(*, ge: int, le: int) -> Any:
    return Annotated[int, Meta(ge=ge, le=le, description="a whole number")]


def text(description: str) -> Any:
    return Annotated[str, Meta(description=description)]


Switch = Annotated[bool, Meta(description="true or false")]
Secret = Annotated[str, Meta(description="a secret", extra={"secret": True})]


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    database_url: Annotated[str, Meta(description="a PostgreSQL URL", extra={"url": True})] | None = None
    # a hot standby for what only reads; None: everything reads the primary
    replica_url: Annotated[str, Meta(description="a PostgreSQL URL", extra={"url": True})] | None = None
    data_dir: text("a folder") | None = None  # the embedded PostgreSQL's; None: the user data folder
    finance_config: text("a TOML file") | None = None  # the chart of accounts and expiry policy; None: the defaults
    secret_key: Secret | None = None
    # the tenant (VTEX account) of the environment's key pairs, and of a single-store database's data
    default_tenant: Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="a VTEX account name")] = (
        DEFAULT_TENANT
    )
    # each store's limits where the tenants table sets none of its own; None: no limit
    tenant_max_rps: whole(ge=1, le=1_000_000) | None = None
    tenant_max_concurrent: whole(ge=1, le=100_000) | None = None
    metrics_tenants_max: whole(ge=0, le=10_000) = 100  # stores with their own label in /metrics
    # how long a suspended tenant's data is kept before `giftcard tenants delete` may remove it
    tenant_retention_days: whole(ge=0, le=100 * 366) = 30
    native_provider_id: Annotated[str, Meta(min_length=1, max_length=100, description="a provider id")] = "VtexGiftCard"
    provider_app_key: text("an app key") | None = None
    provider_app_token: Secret | None = None
    app_key: text("an app key") | None = None
    app_token: Secret | None = None
    default_currency: text("an ISO 4217 currency code") = "USD"
    default_validity_days: whole(ge=1, le=100 * 366) = 5 * 365
    body_bytes_max: whole(ge=1024, le=64 * 1024 * 1024) = 64 * 1024
    pool_size_max: whole(ge=2, le=1000) = 20  # asyncpg's pools keep at least 2 (POOL_SIZE_MIN)
    statement_timeout_s: seconds(gt=0, le=HOUR_S) = REQUEST_STATEMENT_TIMEOUT_S
    provider_get_card_timeout_s: seconds(gt=0, le=HOUR_S) = 1.5
    provider_timeout_s: seconds(gt=0, le=HOUR_S) = 15.0
    provider_retries_max: whole(ge=0, le=10) = 2
    provider_breaker_failures_max: whole(ge=1, le=10_000) = 5
    provider_breaker_open_s: seconds(gt=0, le=HOUR_S) = 5.0
    provider_allowlist: Annotated[tuple[str, ...], Meta(description="a comma-separated list of CIDRs or hosts")] = ()
    # 0: off, holds last until settled or cancelled
    hold_ttl_s: Annotated[float, Meta(ge=0, le=366 * DAY_S, description="a duration")] = 0.0
    hold_sweep_interval_s: seconds(gt=0, le=DAY_S) = 30.0
    lookup_client_failures_max: whole(ge=1, le=1_000_000) = 10  # per (caller key, shopper identity) pair
    # then each failure of that caller waits lookup_failure_delay_s
    lookup_caller_failures_slow_after: whole(ge=0, le=1_000_000) = 100  # 0: every failure waits
    lookup_failure_delay_s: seconds(ge=0, le=60) = 1.0
    lookup_window_s: whole(ge=1, le=int(DAY_S)) = 600
    privacy_poll_s: seconds(ge=0, le=HOUR_S) = 5.0  # how soon every process sees a `privacy forget`
    run_projections: Switch = True
    run_webhooks: Switch = True  # whether `giftcard serve` runs a webhook deliverer
    webhook_attempts_max: whole(ge=1, le=1000) = 10
    webhook_backoff_base_s: seconds(gt=0, le=DAY_S) = 1.0
    webhook_backoff_max_s: seconds(gt=0, le=7 * DAY_S) = 300.0
    webhook_timeout_s: seconds(gt=0, le=HOUR_S) = 10.0
    # where callers reach this service (the native provider's serviceUrl)
    public_url: Annotated[str, Meta(description="a public URL")] | None = None
    # CIDRs whose X-Forwarded-Proto/Host are believed
    trusted_proxies: Annotated[tuple[str, ...], Meta(description="a comma-separated list of CIDRs")] = ()
    # {account}.{this domain} names the request's account (hub.http.accounts); None: the host names none
    account_host_domain: Annotated[str, Meta(pattern=_DOMAIN, description="a domain name")] | None = None
    account_query: Switch = False  # whether VTEX's ?an={account} names the request's account
    # Not from the environment: set by `giftcard serve` (its --workers) and by tests.
    workers: int = 1
    shutdown_timeout_s: float = 10.0

    def __repr__(self) -> str:
        """Without the secrets' values: a settings object printed in a log or a traceback leaks nothing."""
        shown = {name: _shown(name, str(value)) for name, value in msgspec.structs.asdict(self).items() if value}
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @property
    def database(self) -> Database:
        return Database(url=self.database_url, data_dir=self.data_dir, default_tenant=self.default_tenant)

    @property
    def read_database(self) -> Database:
        """The replica when one is configured, else the primary."""
        return (
            Database(url=self.replica_url, data_dir=self.data_dir, default_tenant=self.default_tenant)
            if self.replica_url
            else self.database
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """The settings the environment gives (``overrides`` win); ``SettingRefused`` for a bad value."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in ENVIRONMENT_NAMES:
            raw = environ.get(variable_of(name), "")
            if raw.strip():
                values[name] = setting_value(name, raw)
        values.update(overrides)
        return cls(**values)


class SettingRefused(ValueError):
    """One line: the variable, its value (a secret's never shown) and what is allowed."""

    def __init__(self, name: str, raw: str, allowed: str) -> None:
        field = _FIELDS[name]
        super().__init__(f"{variable_of(name)}={_shown(name, raw)!r} is not {_description(field)} ({allowed})")


def variable_of(name: str) -> str:
    return _VARIABLES.get(name, PREFIX + name.upper())


def setting_value(name: str, raw: str) -> object:
    """``raw`` as the field ``name`` holds it, checked against its type and range."""
    field = _FIELDS[name]
    try:
        value: object = _TEXT_FORMS[name](raw) if name in _TEXT_FORMS else raw.strip()
        if isinstance(_constraints(field), msgspec.inspect.BoolType):
            value = _BOOLEANS[raw.strip().lower()]
        return msgspec.convert(value, _TYPES[name], strict=False)
    except (ValueError, KeyError, msgspec.ValidationError) as e:
        raise SettingRefused(name, raw, _allowed(name, field, e)) from None


def parse_duration_s(value: str) -> float:
    """``3600``, ``90s``, ``30m``, ``72h``, ``7d``; empty or 0 means off."""
    if not value.strip():
        return 0.0
    match = _DURATION.match(value.lower())
    if not match:
        raise ValueError("a duration such as 3600, 90s, 30m, 72h or 7d; 0: off")
    return float(match[1]) * _UNIT_S[match[2]]


def parse_database_url(value: str) -> str:
    if not value.strip().startswith(("postgresql://", "postgres://")):
        raise ValueError("postgresql://user@host:5432/name, several host:port for a failover")
    return value.strip()


def parse_currency(value: str) -> str:
    try:
        exponent_of(value.strip())
    except DomainError:
        raise ValueError("a code such as USD, EUR or JPY") from None
    return value.strip()


def parse_domain(value: str) -> str:
    return value.strip().lower().rstrip(".")


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(entry.strip() for entry in value.split(",") if entry.strip())


# Settings whose text is not simply msgspec's (a number, a word): parsed first, then checked.
_TEXT_FORMS: dict[str, Callable[[str], object]] = {
    "database_url": parse_database_url,
    "replica_url": parse_database_url,
    "default_currency": parse_currency,
    "hold_ttl_s": parse_duration_s,
    "provider_allowlist": parse_list,
    "public_url": parse_public_url,
    "trusted_proxies": parse_trusted_proxies,
    "account_host_domain": parse_domain,
}
_VARIABLES = {"hold_ttl_s": PREFIX + "HOLD_TTL"}  # a duration with its unit written in the value
_NOT_FROM_ENVIRONMENT = ("workers", "shutdown_timeout_s")
_FIELDS = {field.name: field for field in msgspec.inspect.type_info(Settings).fields}
_TYPES = {field.name: field.type for field in msgspec.structs.fields(Settings)}
ENVIRONMENT_NAMES = tuple(name for name in _FIELDS if name not in _NOT_FROM_ENVIRONMENT)
ENVIRONMENT_VARIABLES = tuple(variable_of(name) for name in ENVIRONMENT_NAMES)


def _metadata(field: msgspec.inspect.Field) -> msgspec.inspect.Metadata:
    """The field's Meta, looked for through ``| None``."""
    kind = field.type
    if isinstance(kind, msgspec.inspect.UnionType):
        kind = next(t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType))
    return kind


def _constraints(field: msgspec.inspect.Field) -> msgspec.inspect.Type:
    kind = _metadata(field)
    return kind.type if isinstance(kind, msgspec.inspect.Metadata) else kind


def _description(field: msgspec.inspect.Field) -> str:
    kind = _metadata(field)
    return (
        (kind.extra_json_schema or {}).get("description", "valid")
        if isinstance(kind, msgspec.inspect.Metadata)
        else "valid"
    )


def _extra(name: str) -> dict[str, Any]:
    kind = _metadata(_FIELDS[name])
    return (kind.extra or {}) if isinstance(kind, msgspec.inspect.Metadata) else {}


def _shown(name: str, value: str) -> str:
    if _extra(name).get("secret"):
        return "(not shown)"
    return shown_url(value) if _extra(name).get("url") else value


def _allowed(name: str, field: msgspec.inspect.Field, error: Exception) -> str:
    """What the field accepts, with its default as the example."""
    kind = _constraints(field)
    if name in _TEXT_FORMS:
        return str(error)
    if isinstance(kind, msgspec.inspect.BoolType):
        return "true, false, 1, 0, yes or no"
    if isinstance(kind, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
        bounds = [f"> {_plain(kind.gt)}" if kind.gt is not None else None]
        bounds += [f">= {_plain(kind.ge)}" if kind.ge is not None else None]
        bounds += [f"<= {_plain(kind.le)}" if kind.le is not None else None]
        return f"{' and '.join(b for b in bounds if b)}, e.g. {_plain(field.default)}"
    return str(error)


def _plain(number: object) -> str:
    """15.0 as 15: what an operator types."""
    return f"{number:g}" if isinstance(number, float) else str(number)
