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
import secrets
import sys
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from hub.errors import error_response

log = logging.getLogger(__name__)

HUB = "hub"
PROVIDER = "provider"
KEY_REFRESH_S = 2.0
TOKEN_BYTES = 32

VIEW = "view"
EDIT = "edit"
ROLES = (VIEW, EDIT)
ALL_ROLES = frozenset(ROLES)

HEADERS = {
    HUB: ("X-VTEX-API-AppKey", "X-VTEX-API-AppToken"),
    PROVIDER: ("X-PROVIDER-API-AppKey", "X-PROVIDER-API-AppToken"),
}


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass
class KeyRing:
    """The credentials one audience accepts; stored ones are refreshed from the database."""

    audience: str
    configured: tuple[str, str] | None = None
    stored: dict[str, tuple[bytes, frozenset[str]]] = field(default_factory=dict)

    def verdict(self, key: str | None, token: str | None) -> tuple[int, frozenset[str]]:
        """(200, roles) when the pair is accepted, 401 when absent, 403 when wrong."""
        if not key or not token:
            return 401, frozenset()
        if self.configured is not None:
            key_ok = hmac.compare_digest(key.encode(), self.configured[0].encode())
            token_ok = hmac.compare_digest(token.encode(), self.configured[1].encode())
            if key_ok and token_ok:
                return 200, ALL_ROLES  # the environment's pair bootstraps everything else
        expected = self.stored.get(key)
        if expected is not None and hmac.compare_digest(token_hash(token), expected[0]):
            return 200, expected[1]
        return 403, frozenset()

    async def refresh(self, pool: asyncpg.Pool) -> None:
        rows = await pool.fetch(
            "select app_key, token_hash, roles from api_keys where audience = $1 and revoked_at is null", self.audience
        )
        self.stored = {row["app_key"]: (bytes(row["token_hash"]), frozenset(row["roles"])) for row in rows}


# ---- operators' key management (giftcard keys create|list|revoke) ------------------------


async def create_key(pool: asyncpg.Pool, audience: str, roles: tuple[str, ...]) -> tuple[str, str]:
    """A new pair with these roles; the token is returned once and only its hash is stored."""
    unknown = set(roles) - ALL_ROLES
    if audience not in HEADERS or unknown or not roles:
        raise ValueError(f"audience must be one of {sorted(HEADERS)} and roles a non-empty subset of {list(ROLES)}")
    app_key = f"giftcard-{audience}-{secrets.token_hex(6)}"
    app_token = secrets.token_urlsafe(TOKEN_BYTES)
    await pool.execute(
        "insert into api_keys (app_key, token_hash, audience, roles) values ($1, $2, $3, $4)",
        app_key,
        token_hash(app_token),
        audience,
        sorted(roles),
    )
    return app_key, app_token


async def list_keys(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "select app_key, audience, roles, bootstrap, created_at, revoked_at from api_keys order by created_at"
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


async def keep_refreshed(pool: asyncpg.Pool, rings: list[KeyRing]) -> None:
    while True:
        await asyncio.sleep(KEY_REFRESH_S)
        for ring in rings:
            try:
                await ring.refresh(pool)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("could not refresh %s credentials; keeping the previous set", ring.audience)


def audience_of(path: str) -> str | None:
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


# ---- the auditor's pages: a browser sends HTTP Basic (RFC 7617), not X-VTEX-API headers ------------

AUDIT_PAGES = "/audit"
BASIC_CHALLENGE = 'Basic realm="giftcard audit", charset="UTF-8"'


def is_audit_page(path: str) -> bool:
    return path == AUDIT_PAGES or path.startswith(AUDIT_PAGES + "/")


def basic_verdict(ring: KeyRing, authorization: str | None) -> tuple[int, str | None, frozenset[str]]:
    """(status, key, roles) for ``Authorization: Basic base64(key:token)``: 401 when there is no Basic
    header, 403 when it does not decode or the pair is wrong; the key only when accepted."""
    scheme, _, encoded = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return 401, None, frozenset()
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError both are
        return 403, None, frozenset()
    key, colon, token = decoded.partition(":")  # a key has no colon; a token may
    if not colon:
        return 403, None, frozenset()
    status, roles = ring.verdict(key, token)
    return status, (key if status == 200 else None), roles


def audit_page_refusal(status: int) -> web.Response:
    """Plain text for a person; never the credentials sent."""
    if status == 401:
        text = "Sign in with a hub-consumer key (as user name) and its token (as password)."
        return web.Response(status=401, text=text, headers={"WWW-Authenticate": BASIC_CHALLENGE})
    # A browser keeps refused Basic credentials for the site until it closes: say how to try again.
    text = "These credentials are not accepted here (a key with the view role is needed). Open the page in a new private window to sign in again."
    return web.Response(status=403, text=text)


def make_auth_middleware(rings: dict[str, KeyRing]):
    @web.middleware
    async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
        if is_audit_page(request.path):
            status, key, roles = basic_verdict(rings[HUB], request.headers.get("Authorization"))
            if status != 200 or role_needed(request) not in roles:
                return audit_page_refusal(status)
            request["actor"] = key
            return await handler(request)
        audience = audience_of(request.path)
        if audience is not None:
            key_header, token_header = HEADERS[audience]
            status, roles = rings[audience].verdict(request.headers.get(key_header), request.headers.get(token_header))
            if status != 200:
                return web.Response(status=status)
            needed = role_needed(request)
            if needed not in roles:
                return error_response(403, "forbidden", f"this key lacks the {needed!r} role for {request.method}")
            request["actor"] = request.headers[key_header]
        return await handler(request)

    return auth_middleware
