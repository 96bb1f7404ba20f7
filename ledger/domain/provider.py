"""A gift card provider registered with the hub: what makes a registration valid.

Pure rules, no I/O. The hub forwards every call to ``serviceUrl + protocol path``
with nothing added in between, so a ``serviceUrl`` must be absolute, carry at
least one path segment and end without a slash (VTEX's own rule, which avoids
``//`` in forwarded URLs).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import msgspec

from ledger.domain.errors import Conflict, InvalidRequest

PROVIDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
SERVICE_URL_CHARS_MAX = 2048


class ProviderSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a PUT declares about an external provider (credentials travel separately, encrypted)."""

    id: str
    service_url: str
    oauth_provider: str = "vtex"
    caption: str | None = None
    pre_auth_enabled: bool = True
    cancel_enabled: bool = True


class NativeProviderIsBuiltIn(Conflict):
    code = "native_provider_is_built_in"


def check_provider_id(provider_id: str) -> None:
    if not PROVIDER_ID.match(provider_id):
        raise InvalidRequest(
            f"provider id {provider_id!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )


def check_service_url(url: str) -> None:
    if len(url) > SERVICE_URL_CHARS_MAX:
        raise InvalidRequest(f"serviceUrl is longer than {SERVICE_URL_CHARS_MAX} characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError:
        raise InvalidRequest(f"serviceUrl {url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"serviceUrl {url!r} must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise InvalidRequest("serviceUrl must not carry credentials; send appKey and appToken instead")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise InvalidRequest("serviceUrl must not have a query or fragment")
    if parts.path.endswith("/"):
        raise InvalidRequest(f"serviceUrl {url!r} must not end with a slash")
    if not parts.path.strip("/"):
        raise InvalidRequest(f"serviceUrl {url!r} must include at least one path segment, e.g. /v1/giftcard")
    if "//" in parts.path or any(c.isspace() for c in url):
        raise InvalidRequest(f"serviceUrl {url!r} has an empty path segment or white space")
    del port


def check_registration(spec: ProviderSpec, native_id: str) -> None:
    check_provider_id(spec.id)
    if spec.id == native_id:
        raise NativeProviderIsBuiltIn(f"{native_id} is the built-in native provider; it cannot be changed")
    check_service_url(spec.service_url)
    if not spec.oauth_provider.strip():
        raise InvalidRequest("oauthProvider must be a non-empty string (most stores use 'vtex')")
