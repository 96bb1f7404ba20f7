"""The address callers reach this service at, for the links it hands out (the native provider's
``serviceUrl``, which a hub then calls with the provider's credentials).

Never the request's ``Host`` header: any caller can send ``Host: evil.example`` and have that
address handed to whoever lists the providers next. In order of preference:

1. ``GIFTCARD_PUBLIC_URL``, when configured;
2. ``X-Forwarded-Proto`` and ``X-Forwarded-Host``, only from a proxy in ``GIFTCARD_TRUSTED_PROXIES``
   (the last value of each, the one the nearest proxy, which we trust, vouches for);
3. the scheme and the local address the connection arrived on, which no request header can change.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from aiohttp import web

_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9-]{1,63}|\[[0-9A-Fa-f:.]+\]")
_PORT_MAX = 65535


def parse_public_url(text: str) -> str | None:
    """``GIFTCARD_PUBLIC_URL``: an absolute http(s) URL with a host and no query; empty means unset."""
    text = text.strip()
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not is_host(parts.netloc) or parts.query or parts.fragment:
        raise ValueError("an http(s) URL such as https://gift.example.com, without query")
    return text.rstrip("/")  # links are appended to it: no trailing slash, or they would hold "//"


def parse_trusted_proxies(text: str) -> tuple[str, ...]:
    """``GIFTCARD_TRUSTED_PROXIES``: comma-separated addresses or CIDRs (``10.0.0.0/8,::1``)."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
    return tuple(networks)


def is_host(value: str) -> bool:
    """``name``, ``name:port``, ``[v6]`` or ``[v6]:port``, and nothing else (no user, path or spaces)."""
    host, _, port = value.rpartition(":") if not value.endswith("]") else (value, "", "")
    if not host:
        host, port = value, ""
    if port and not (port.isdigit() and 0 < int(port) <= _PORT_MAX):
        return False
    return bool(_HOST.fullmatch(host))


def public_base_url(request: web.Request, public_url: str | None, trusted_proxies: tuple[str, ...]) -> str:
    """Where this service is reached from outside, without a trailing slash: ``public_url`` when the
    operator set it, else what a trusted proxy forwarded, else the connection's own address."""
    if public_url:
        return public_url.rstrip("/")
    forwarded = forwarded_base_url(request, trusted_proxies)
    return forwarded or connection_base_url(request)


def forwarded_base_url(request: web.Request, trusted_proxies: tuple[str, ...]) -> str | None:
    if not trusted_proxies or not is_from(request.remote, trusted_proxies):
        return None
    proto = last_value(request.headers.get("X-Forwarded-Proto")).lower()
    host = last_value(request.headers.get("X-Forwarded-Host"))
    if proto not in ("http", "https") or not is_host(host):
        return None
    return f"{proto}://{host}"


def connection_base_url(request: web.Request) -> str:
    """The scheme of the connection itself and the local address it arrived on."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return f"{request.scheme}://localhost"
    address, port = sockname[0], sockname[1]
    host = f"[{address}]" if ":" in address else address
    return f"{request.scheme}://{host}:{port}"


def is_from(remote: str | None, networks: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False  # a Unix socket, or no peer address: not a proxy we know
    return any(address in ipaddress.ip_network(network) for network in networks)


def last_value(header: str | None) -> str:
    """The last of a comma-separated header's values: the one the nearest proxy added."""
    return (header or "").rsplit(",", 1)[-1].strip()
