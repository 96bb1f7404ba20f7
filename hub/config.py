"""Settings, all from ``GIFTCARD_*`` environment variables (documented in the README)."""

from __future__ import annotations

import os
import re

import msgspec

from hub.public_address import parse_public_url, parse_trusted_proxies
from ledger.postgres.database import REQUEST_STATEMENT_TIMEOUT_S

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    """``3600``, ``90s``, ``30m``, ``72h``, ``7d``; empty or 0 means off."""
    if not text.strip():
        return 0.0
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"a duration looks like 3600, 30m, 72h or 7d; got {text!r}")
    return float(match[1]) * _UNIT_S[match[2]]


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    database_url: str | None = None
    replica_url: str | None = None  # a hot standby for what only reads; None: everything reads the primary
    native_provider_id: str = "VtexGiftCard"
    provider_app_key: str | None = None
    provider_app_token: str | None = None
    app_key: str | None = None
    app_token: str | None = None
    default_currency: str = "USD"
    default_validity_days: int = 5 * 365
    body_bytes_max: int = 64 * 1024
    pool_size_max: int = 20
    statement_timeout_s: float = REQUEST_STATEMENT_TIMEOUT_S
    shutdown_timeout_s: float = 10.0
    provider_get_card_timeout_s: float = 1.5
    provider_timeout_s: float = 15.0
    provider_retries_max: int = 2
    provider_breaker_failures_max: int = 5
    provider_breaker_open_s: float = 5.0
    provider_allowlist: tuple[str, ...] = ()
    hold_ttl_s: float = 0.0  # off: holds last until settled or cancelled
    hold_sweep_interval_s: float = 30.0
    lookup_client_failures_max: int = 10  # per (caller key, shopper identity) pair
    lookup_caller_failures_slow_after: int = 100  # then each failure of that caller waits lookup_failure_delay_s
    lookup_failure_delay_s: float = 1.0
    lookup_window_s: int = 600
    run_projections: bool = True
    public_url: str | None = None  # where callers reach this service (the native provider's serviceUrl)
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-Proto/Host are believed
    workers: int = 1  # serve's web processes on one port; set by ``giftcard serve --workers``, not the environment

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        defaults = cls()
        values: dict[str, object] = {
            "database_url": env.get("GIFTCARD_DATABASE_URL") or None,
            "replica_url": env.get("GIFTCARD_REPLICA_URL") or None,
            "native_provider_id": env.get("GIFTCARD_NATIVE_PROVIDER_ID", defaults.native_provider_id),
            "provider_app_key": env.get("GIFTCARD_PROVIDER_APP_KEY") or None,
            "provider_app_token": env.get("GIFTCARD_PROVIDER_APP_TOKEN") or None,
            "app_key": env.get("GIFTCARD_APP_KEY") or None,
            "app_token": env.get("GIFTCARD_APP_TOKEN") or None,
            "default_currency": env.get("GIFTCARD_DEFAULT_CURRENCY", defaults.default_currency),
            "default_validity_days": int(env.get("GIFTCARD_DEFAULT_VALIDITY_DAYS", defaults.default_validity_days)),
            "body_bytes_max": int(env.get("GIFTCARD_BODY_BYTES_MAX", defaults.body_bytes_max)),
            "pool_size_max": int(env.get("GIFTCARD_POOL_SIZE_MAX", defaults.pool_size_max)),
            "statement_timeout_s": float(env.get("GIFTCARD_STATEMENT_TIMEOUT_S", defaults.statement_timeout_s)),
            "provider_get_card_timeout_s": float(
                env.get("GIFTCARD_PROVIDER_GET_CARD_TIMEOUT_S", defaults.provider_get_card_timeout_s)
            ),
            "provider_timeout_s": float(env.get("GIFTCARD_PROVIDER_TIMEOUT_S", defaults.provider_timeout_s)),
            "provider_retries_max": int(env.get("GIFTCARD_PROVIDER_RETRIES_MAX", defaults.provider_retries_max)),
            "provider_breaker_failures_max": int(
                env.get("GIFTCARD_PROVIDER_BREAKER_FAILURES_MAX", defaults.provider_breaker_failures_max)
            ),
            "lookup_client_failures_max": int(
                env.get("GIFTCARD_LOOKUP_CLIENT_FAILURES_MAX", defaults.lookup_client_failures_max)
            ),
            "lookup_caller_failures_slow_after": int(
                env.get("GIFTCARD_LOOKUP_CALLER_FAILURES_SLOW_AFTER", defaults.lookup_caller_failures_slow_after)
            ),
            "lookup_failure_delay_s": float(
                env.get("GIFTCARD_LOOKUP_FAILURE_DELAY_S", defaults.lookup_failure_delay_s)
            ),
            "lookup_window_s": int(env.get("GIFTCARD_LOOKUP_WINDOW_S", defaults.lookup_window_s)),
            "run_projections": env.get("GIFTCARD_RUN_PROJECTIONS", "true").strip().lower()
            not in ("0", "false", "no", "off"),
            "hold_ttl_s": parse_duration_s(env.get("GIFTCARD_HOLD_TTL", "")),
            "hold_sweep_interval_s": float(env.get("GIFTCARD_HOLD_SWEEP_INTERVAL_S", defaults.hold_sweep_interval_s)),
            "provider_allowlist": tuple(
                entry.strip() for entry in env.get("GIFTCARD_PROVIDER_ALLOWLIST", "").split(",") if entry.strip()
            ),
            "public_url": parse_public_url(env.get("GIFTCARD_PUBLIC_URL", "")),
            "trusted_proxies": parse_trusted_proxies(env.get("GIFTCARD_TRUSTED_PROXIES", "")),
            "provider_breaker_open_s": float(
                env.get("GIFTCARD_PROVIDER_BREAKER_OPEN_S", defaults.provider_breaker_open_s)
            ),
        }
        values.update(overrides)
        return cls(**values)


def native_provider_id_from_env() -> str:
    """The native provider's id, read when a command runs (not when the parser is built, so that
    ``giftcard --help`` works whatever the environment holds)."""
    return Settings.from_env().native_provider_id
