"""Which store a request names besides its key, and the addresses a store's answers hand out.

- **Links carry the account**, first, as VTEX's do (``{account}/giftcards/{id}``, appended to
  ``https://api.vtex.com``): ``/acme/native/giftcards/{id}``, ``/acme/api/giftcards/{id}``,
  ``/acme/api/giftcardproviders/{pid}/giftcards/{id}``, and the native provider's ``serviceUrl``
  ``{public URL}/acme/native``. The default tenant's keep today's shape (``/native/…``), so a
  single store's links, and the ``serviceUrl`` another hub registered, do not change.
- **Those paths are served** by the same handlers (``account_routes``), and every one resolves
  for the key that was handed it: the account in the path must be the key's tenant.
- **Optionally** the host (``{account}.{GIFTCARD_ACCOUNT_HOST_DOMAIN}``) and VTEX's ``?an=``
  (``GIFTCARD_ACCOUNT_QUERY``) name the account too. Whatever names one, a key never reaches
  another tenant: a name that is not the key's tenant (or no tenant at all) is a 403
  ``tenant_mismatch`` naming both.
- **The auditor's surfaces** (``/audit…``, ``/api/audit/…``) also take ``?tenant=ACCOUNT``. A
  tenant's key reads only its own tenant (another is a 403 naming it); an operator's key
  (``hub.http.auth``: the environment's hub pair, or ``keys create --operator``) reads the tenant
  it names, or every tenant at once (the scope ``ALL_TENANTS``) when it names none.
"""

from __future__ import annotations

from aiohttp import web

from hub.config import Settings
from hub.errors import error_response
from hub.http import auth
from hub.http.state import POOL, SETTINGS, TENANTS_ISOLATED
from ledger.postgres.tenancy import ACCOUNT, ALL_TENANTS, is_account, tenant_scope

ACCOUNT_PATH_PREFIX = f"/{{account:{ACCOUNT.pattern}}}"
ACCOUNT_PARAMETER = "/{account}"  # the prefix as a route's formatter (and the OpenAPI document) write it
AUDIT_API = "/api/audit/"
TENANT_QUERY = "tenant"
MISMATCH = "tenant_mismatch"


# ---- the addresses handed out ------------------------------------------------------------------


def account_routes(routes: list[web.RouteDef]) -> list[web.RouteDef]:
    """The same routes under ``/{account}``: where a store's links point."""
    return [web.route(route.method, ACCOUNT_PATH_PREFIX + route.path, route.handler) for route in routes]


def link_base(request: web.Request, base: str) -> str:
    """``base`` (``/native``, ``/api``, ``/api/giftcardproviders``) as the links of the request's
    tenant start: behind its account, but the default tenant's as they always were."""
    tenant = request[auth.TENANT]
    return base if tenant == request.app[SETTINGS].default_tenant else f"/{tenant}{base}"


# ---- the accounts a request names --------------------------------------------------------------


def named_accounts(request: web.Request, settings: Settings) -> list[tuple[str, str]]:
    """(where, account) for each place that names one: the path, the host, ``?an=``."""
    named = []
    if "account" in request.match_info:
        named.append(("the path", request.match_info["account"]))
    if settings.account_host_domain:
        host_account = account_of_host(request.host, settings.account_host_domain)
        if host_account is not None:
            named.append(("the host", host_account))
    if settings.account_query and "an" in request.query:
        named.append(("?an=", request.query["an"]))
    return named


def account_of_host(host: str, domain: str) -> str | None:
    """``acme`` for ``acme.gift.example.com[:port]`` under the domain ``gift.example.com``; None for
    a host not under it (an address, the domain itself), which names no account."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    suffix = "." + domain.lower()
    name = name.lower().rstrip(".")
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def is_audit_surface(path: str) -> bool:
    return auth.is_audit_page(path) or path.startswith(AUDIT_API)


def refusal(request: web.Request, status: int, code: str, message: str) -> web.Response:
    """JSON, but plain text for the auditor's pages, which a person reads in a browser."""
    if auth.is_audit_page(request.path):
        return web.Response(status=status, text=message)
    return error_response(status, code, message)


def make_account_middleware():
    """Inside the auth middleware: the request's tenant (its key's) is known, and in scope."""

    @web.middleware
    async def account_middleware(request: web.Request, handler) -> web.StreamResponse:
        tenant = request.get(auth.TENANT)
        if tenant is None:  # no key asked (health, metrics, the OpenAPI document)
            return await handler(request)
        named = named_accounts(request, request.app[SETTINGS])
        if is_audit_surface(request.path):
            return await _audited(request, handler, named)
        for where, account in named:
            if account != tenant:
                return _mismatch(request, tenant, where, account)
        return await handler(request)

    return account_middleware


def _mismatch(request: web.Request, tenant: str, where: str, account: str) -> web.Response:
    return refusal(
        request,
        403,
        MISMATCH,
        f"{where} names the account {account!r}, but this key belongs to the tenant {tenant!r}: "
        "a key acts for its own tenant only",
    )


async def _audited(request: web.Request, handler, named: list[tuple[str, str]]) -> web.StreamResponse:
    """The auditor's surfaces: the tenant named (``?tenant=`` too), checked against what the key may read."""
    if TENANT_QUERY in request.query:
        asked = request.query[TENANT_QUERY]
        if not is_account(asked):
            return refusal(
                request,
                400,
                "invalid_request",
                f"tenant must be a VTEX account name ({ACCOUNT.pattern}), got {asked!r}",
            )
        named = [*named, ("?tenant=", asked)]
    tenant = request[auth.TENANT]
    if not request[auth.OPERATOR]:
        for where, account in named:
            if account != tenant:
                return _mismatch(request, tenant, where, account)
        return await handler(request)
    accounts = {account for _, account in named}
    if len(accounts) > 1:
        names = ", ".join(f"{where} {account!r}" for where, account in named)
        return refusal(request, 403, MISMATCH, f"the request names more than one tenant: {names}")
    if not accounts:
        with tenant_scope(ALL_TENANTS):  # an operator naming no tenant reads every one
            return await handler(request)
    (account,) = accounts
    unreadable = await _unreadable(request, account)
    if unreadable is not None:
        return unreadable
    with tenant_scope(account):
        return await handler(request)


async def _unreadable(request: web.Request, account: str) -> web.Response | None:
    """Why an operator cannot read ``account`` alone here, or None when it can."""
    exists = await request.app[POOL].fetchval(
        "select true from tenants where account = $1 and deleted_at is null", account
    )
    if not exists:
        return refusal(request, 404, "tenant_not_found", f"there is no tenant {account!r}")
    if account != request.app[SETTINGS].default_tenant and not request.app[TENANTS_ISOLATED]:
        return refusal(
            request,
            403,
            "tenant_not_isolated",
            f"this deployment serves only its default tenant, not {account!r}: its database does not keep "
            "tenants apart (see the README's Many stores)",
        )
    return None
