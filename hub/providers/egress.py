"""Where the hub may send requests: never to internal addresses, unless an operator allows them.

A ``serviceUrl`` is chosen by whoever can edit the registry; without this check it
would let them make the hub call loopback admin ports, cloud metadata services or
the private network (SSRF). Internal means loopback, private, link-local, shared,
reserved, multicast or unspecified, judged for an IPv6 address that carries an IPv4
one by that IPv4 address. ``GIFTCARD_PROVIDER_ALLOWLIST`` lists CIDRs
(``10.0.0.0/8``) or host names (``giftcards.internal``) that are allowed anyway.
The check runs when a provider is registered and again at every connection, so a
name that later resolves elsewhere (DNS rebinding) is caught too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from ledger.domain.errors import InvalidRequest

RESOLVE_TIMEOUT_S = 2.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DestinationRefused(InvalidRequest):
    code = "service_url_not_allowed"


def embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries, where it reaches that IPv4 host: IPv4-mapped
    (``::ffff:a.b.c.d``) or 6to4 (``2002:AABB:CCDD::/48``, routed to ``a.b.c.d`` by any 6to4
    relay). NAT64 (``64:ff9b::/96``) and Teredo (``2001::/32``) need no unwrapping: Python
    already counts both ranges as internal."""
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped or address.sixtofour or address
    return address


def is_internal(address: IPAddress) -> bool:
    address = embedded_ipv4(address)
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv4Address) and address in ipaddress.ip_network("100.64.0.0/10"))
    )


class EgressPolicy:
    def __init__(self, allowlist: tuple[str, ...] = ()) -> None:
        self.networks = []
        self.hostnames = set()
        for entry in (e.strip() for e in allowlist if e.strip()):
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hostnames.add(entry.lower().rstrip("."))

    def permits_address(self, address: IPAddress) -> bool:
        return not is_internal(address) or any(address in network for network in self.networks)

    def permits_hostname(self, hostname: str) -> bool:
        return hostname.lower().rstrip(".") in self.hostnames

    def addresses_allowed(self, host: str, addresses: list[str]) -> list[str]:
        """Those of ``host``'s addresses (or of the IP literal itself) a request may connect to, checked
        at every connection (a name may resolve elsewhere by then); OSError when none is."""
        if self.permits_hostname(host):
            return addresses
        allowed = [a for a in addresses if self.permits_address(ipaddress.ip_address(a.split("%")[0]))]
        if not allowed:
            raise OSError(f"{host} resolves only to internal addresses the hub may not call")
        return allowed

    async def check_url(self, url: str) -> None:
        """Refuses a serviceUrl whose host is, or resolves to, an address the hub may not call."""
        host = urlsplit(url).hostname or ""
        if self.permits_hostname(host):
            return
        for address in await self._addresses(host):
            if not self.permits_address(address):
                raise DestinationRefused(
                    f"serviceUrl host {host!r} is an internal address ({address}); "
                    "add it to GIFTCARD_PROVIDER_ALLOWLIST to allow it"
                )

    async def _addresses(self, host: str) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            raise InvalidRequest(f"serviceUrl host {host!r} cannot be resolved") from None
        return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


class GuardedResolver(AbstractResolver):
    """Resolves names for the provider client, dropping every address the policy refuses."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy
        self.inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        allowed = set(self.policy.addresses_allowed(host, [r["host"] for r in results]))
        return [r for r in results if r["host"] in allowed]

    async def close(self) -> None:
        await self.inner.close()


def refuses_literal(policy: EgressPolicy, url: str) -> bool:
    """IP literals skip the resolver, so the client checks them itself before connecting."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not policy.permits_address(address)
