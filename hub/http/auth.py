"""Who may call what: hub consumers (``X-VTEX-API-AppKey/AppToken``) and Provider Protocol
callers (``X-PROVIDER-API-AppKey/AppToken``).

A pair configured in the environment is compared in constant time. Stored pairs
(generated on a first start, or created by operators) are kept as SHA-256 hashes
of their tokens: the tokens are random and long, so a plain hash is enough.
Missing headers answer 401 and wrong ones 403, both with an empty body, as the
VTEX guide requires of providers. Every audience's keys carry roles: an accepted pair
without the role a request needs (``role_needed``) gets 403 with a JSON error naming it.

The auditor's pages (``/audit``) are opened in a browser, which cannot send those headers:
they take the same hub-consumer pairs as HTTP Basic credentials (the key as user name, the
token as password) and need the ``view`` role; missing answers 401 with a Basic challenge,
wrong 403.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import sys
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import asyncpg
from aiohttp import web

from hub.errors import error_response
from ledger.postgres.tenancy import ACCOUNT, ALL_TENANTS, DEFAULT_TENANT, NO_TENANT, is_account, tenant_scope

log = logging.getLogger(__name__)

HUB = "hub"
PROVIDER = "provider"
KEY_REFRESH_S = 2.0
TOKEN_BYTES = 32

VIEW = "view"
EDIT = "edit"
ROLES = (VIEW, EDIT)
ALL_ROLES = frozenset(ROLES)

# What an accepted request carries for its handlers: the key that asked (None for the auditor's
# pages' Basic credentials refused), its tenant, and whether the key is an operator's.
ACTOR = web.RequestKey("actor", str | None)
TENANT = web.RequestKey("tenant", str)
OPERATOR = web.RequestKey("operator", bool)

HEADERS = {
    HUB: ("X-VTEX-API-AppKey", "X-VTEX-API-AppToken"),
    PROVIDER: ("X-PROVIDER-API-AppKey", "X-PROVIDER-API-AppToken"),
}


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Verdict(NamedTuple):
    """What a presented pair earns: 200 with the key's roles and tenant, 401 when absent, 403 when wrong.
    An operator's key may also read every tenant's audit (``hub.http.accounts``)."""

    status: int
    roles: frozenset[str] = frozenset()
    tenant: str = NO_TENANT
    operator: bool = False


class StoredKey(NamedTuple):
    token_hash: bytes
    roles: frozenset[str]
    tenant: str
    operator: bool = False


@dataclass
class KeyRing:
    """The credentials one audience accepts, each with its tenant; stored ones are refreshed from
    the database. The environment's pair belongs to ``default_tenant``."""

    audience: str
    default_tenant: str = DEFAULT_TENANT
    configured: tuple[str, str] | None = None
    stored: dict[str, StoredKey] = field(default_factory=dict)
    # False where row-level security cannot keep the tenants apart (hub.app.tenants_isolated)
    other_tenants_served: bool = True

    @property
    def name(self) -> str:
        return f"{self.audience} credentials"

    def verdict(self, key: str | None, token: str | None) -> Verdict:
        if not key or not token:
            return Verdict(401)
        if self.configured is not None:
            key_ok = hmac.compare_digest(key.encode(), self.configured[0].encode())
            token_ok = hmac.compare_digest(token.encode(), self.configured[1].encode())
            if key_ok and token_ok:
                # the environment's pair bootstraps everything else: the deployment's own, an operator's
                return Verdict(200, ALL_ROLES, self.default_tenant, operator=True)
        expected = self.stored.get(key)
        if expected is not None and hmac.compare_digest(token_hash(token), expected.token_hash):
            if expected.tenant != self.default_tenant and not self.other_tenants_served:
                return Verdict(403, tenant=expected.tenant)
            return Verdict(200, expected.roles, expected.tenant, expected.operator)
        return Verdict(403)

    async def refresh(self, pool: asyncpg.Pool) -> None:
        with tenant_scope(ALL_TENANTS):  # a key names its tenant: every tenant's keys are read to learn it
            rows = await pool.fetch(
                "select app_key, token_hash, roles, tenant_id, operator from api_keys"
                " where audience = $1 and revoked_at is null",
                self.audience,
            )
        self.stored = {
            row["app_key"]: StoredKey(
                bytes(row["token_hash"]), frozenset(row["roles"]), row["tenant_id"], row["operator"]
            )
            for row in rows
        }


@dataclass
class TenantStates:
    """What each process knows of the tenants' states, refreshed beside the keys: the accounts
    suspended (``giftcard tenants suspend``; a deleted tenant stays suspended), whose requests are
    answered 403 ``tenant_suspended`` however good their credentials."""

    name = "tenants' states"
    suspended: frozenset[str] = frozenset()

    async def refresh(self, pool: asyncpg.Pool) -> None:
        rows = await pool.fetch("select account from tenants where suspended_at is not null")
        self.suspended = frozenset(row["account"] for row in rows)


# ---- operators' key management (giftcard keys create|list|revoke) ------------------------


async def create_key(
    pool: asyncpg.Pool, audience: str, roles: tuple[str, ...], tenant: str = DEFAULT_TENANT, *, operator: bool = False
) -> tuple[str, str]:
    """A new pair of ``tenant`` with these roles (an ``operator``'s also reads every tenant's audit);
    the token is returned once and only its hash is stored. The tenant is created with its first key;
    a deleted tenant takes none (ValueError)."""
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("insert into tenants (account) values ($1) on conflict do nothing", _account(tenant))
        return await insert_key(connection, audience, roles, tenant, operator=operator)


async def insert_key(
    connection: asyncpg.Connection, audience: str, roles: tuple[str, ...], tenant: str, *, operator: bool = False
) -> tuple[str, str]:
    """``create_key`` inside the caller's transaction, for a tenant that exists."""
    unknown = set(roles) - ALL_ROLES
    if audience not in HEADERS or unknown or not roles:
        raise ValueError(f"audience must be one of {sorted(HEADERS)} and roles a non-empty subset of {list(ROLES)}")
    if await connection.fetchval("select deleted_at from tenants where account = $1", _account(tenant)) is not None:
        raise ValueError(f"tenant {tenant!r} was deleted: it takes no new keys")
    app_key = f"giftcard-{audience}-{secrets.token_hex(6)}"
    app_token = secrets.token_urlsafe(TOKEN_BYTES)
    await connection.execute(
        "insert into api_keys (app_key, token_hash, audience, roles, tenant_id, operator)"
        " values ($1, $2, $3, $4, $5, $6)",
        app_key,
        token_hash(app_token),
        audience,
        sorted(roles),
        tenant,
        operator,
    )
    return app_key, app_token


def _account(tenant: str) -> str:
    if not is_account(tenant):
        raise ValueError(f"tenant {tenant!r} is not a VTEX account name ({ACCOUNT.pattern})")
    return tenant


def printed_pair(audience: str, pair: tuple[str, str]) -> str:
    """A new pair as ``keys create`` and ``tenants create`` print it: the headers a caller sends."""
    key_header, token_header = HEADERS[audience]
    return f"{key_header}: {pair[0]}\n{token_header}: {pair[1]}"


async def list_keys(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "select app_key, tenant_id, audience, roles, bootstrap, operator, created_at, revoked_at"
        " from api_keys order by created_at"
    )


async def revoke_key(pool: asyncpg.Pool, app_key: str) -> bool:
    revoked = await pool.fetchval(
        "update api_keys set revoked_at = clock_timestamp() where app_key = $1 and revoked_at is null returning 1",
        app_key,
    )
    return revoked is not None


async def bootstrap_pair(pool: asyncpg.Pool, ring: KeyRing) -> tuple[str, str] | None:
    """Generates and stores the audience's first pair when none is configured; returns it once."""
    if ring.configured is not None:
        return None
    app_key = f"giftcard-{ring.audience}-{secrets.token_hex(6)}"
    app_token = secrets.token_urlsafe(TOKEN_BYTES)
    inserted = await pool.fetchval(
        """
        insert into api_keys (app_key, token_hash, audience, bootstrap) values ($1, $2, $3, true)
        on conflict do nothing returning app_key
        """,
        app_key,
        token_hash(app_token),
        ring.audience,
    )
    return (app_key, app_token) if inserted else None


def announce(audience: str, pair: tuple[str, str]) -> None:
    """Printed once, on the terminal that started the first run; never logged, never stored in clear."""
    key_header, token_header = HEADERS[audience]
    print(
        f"Generated {audience} credentials (shown once; only a hash is kept):\n"
        f"  {key_header}: {pair[0]}\n  {token_header}: {pair[1]}",
        file=sys.stderr,
        flush=True,
    )


class Refreshed(Protocol):
    """What is read again from the database with the keys: key rings, tenant limits and states."""

    name: str

    async def refresh(self, pool: asyncpg.Pool) -> None: ...


async def keep_refreshed(pool: asyncpg.Pool, refreshed: list[Refreshed]) -> None:
    while True:
        await asyncio.sleep(KEY_REFRESH_S)
        for each in refreshed:
            try:
                await each.refresh(pool)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("could not refresh %s; keeping the previous set", each.name)


def audience_of(path: str) -> str | None:
    path = without_account(path)  # /{account}/native/…, /{account}/api/…: the links a store's answers carry
    if path == "/native" or path.startswith("/native/"):
        return PROVIDER
    if path.startswith("/api/"):
        return HUB
    return None


def role_needed(request: web.Request) -> str:
    """VTEX's License Manager split: reading (GETs and searches) is "view", anything else "edit"."""
    if request.method in ("GET", "HEAD") or request.path.endswith("/_search"):
        return VIEW
    return EDIT


# A store's links carry its account first, as VTEX's do: /{account}/native/giftcards/{id} (hub.http.accounts).
ACCOUNT_PREFIX = re.compile(r"/([a-z0-9][a-z0-9-]{0,62})(?=/(?:native|api)(?:/|$))")


def without_account(path: str) -> str:
    """``path`` without a leading ``/{account}`` before ``/native`` or ``/api``."""
    prefix = ACCOUNT_PREFIX.match(path)
    return path[prefix.end() :] if prefix else path


# ---- the auditor's pages: a browser sends HTTP Basic (RFC 7617), not X-VTEX-API headers ------------

AUDIT_PAGES = "/audit"
BASIC_CHALLENGE = 'Basic realm="giftcard audit", charset="UTF-8"'


def is_audit_page(path: str) -> bool:
    return path == AUDIT_PAGES or path.startswith(AUDIT_PAGES + "/")


def basic_verdict(ring: KeyRing, authorization: str | None) -> tuple[Verdict, str | None]:
    """(verdict, key) for ``Authorization: Basic base64(key:token)``: 401 when there is no Basic
    header, 403 when it does not decode or the pair is wrong; the key only when accepted."""
    scheme, _, encoded = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return Verdict(401), None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError both are
        return Verdict(403), None
    key, colon, token = decoded.partition(":")  # a key has no colon; a token may
    if not colon:
        return Verdict(403), None
    verdict = ring.verdict(key, token)
    return verdict, (key if verdict.status == 200 else None)


def audit_page_refusal(status: int) -> web.Response:
    """Plain text for a person; never the credentials sent."""
    if status == 401:
        text = "Sign in with a hub-consumer key (as user name) and its token (as password)."
        return web.Response(status=401, text=text, headers={"WWW-Authenticate": BASIC_CHALLENGE})
    # A browser keeps refused Basic credentials for the site until it closes: say how to try again.
    text = "These credentials are not accepted here (a key with the view role is needed). Open the page in a new private window to sign in again."
    return web.Response(status=403, text=text)


def make_auth_middleware(rings: dict[str, KeyRing], states: TenantStates):
    """A request accepted runs in its key's tenant (``tenant_scope``): every statement it makes
    sees that store's rows only. One without a key (health, metrics, the OpenAPI document) in none.
    A suspended tenant's requests, rightly signed, are refused on every surface."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
        if is_audit_page(request.path):
            verdict, key = basic_verdict(rings[HUB], request.headers.get("Authorization"))
            if verdict.status != 200 or role_needed(request) not in verdict.roles:
                return audit_page_refusal(verdict.status)
            return await _handled_in_tenant(request, handler, key, verdict, states)
        audience = audience_of(request.path)
        if audience is None:
            return await handler(request)
        key_header, token_header = HEADERS[audience]
        verdict = rings[audience].verdict(request.headers.get(key_header), request.headers.get(token_header))
        if verdict.status == 403 and verdict.tenant:
            return error_response(
                403,
                "tenant_not_isolated",
                f"this deployment serves only its default tenant, not {verdict.tenant!r}: its database does not "
                "keep tenants apart (see the README's Many stores)",
            )
        if verdict.status != 200:
            return web.Response(status=verdict.status)
        needed = role_needed(request)
        if needed not in verdict.roles:
            return error_response(403, "forbidden", f"this key lacks the {needed!r} role for {request.method}")
        return await _handled_in_tenant(request, handler, request.headers[key_header], verdict, states)

    return auth_middleware


async def _handled_in_tenant(
    request: web.Request, handler, key: str | None, verdict: Verdict, states: TenantStates
) -> web.StreamResponse:
    if verdict.tenant in states.suspended:
        return error_response(
            403, "tenant_suspended", f"the store {verdict.tenant!r} is suspended; its data is kept (ask the operator)"
        )
    request[ACTOR] = key
    request[TENANT] = verdict.tenant
    request[OPERATOR] = verdict.operator
    with tenant_scope(verdict.tenant):
        return await handler(request)
