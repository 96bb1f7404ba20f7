"""The deliverer's HTTP client: one POST at a time per connection, over kept-alive HTTP/1.1.

A delivery is a small POST whose answer matters only by its status. aiohttp's client, which the
provider calls keep, spends about 130 µs of CPU on one (asyncio, loopback: ``python -m
bench.webhook_client``); this client writes the request in one piece and lets llhttp (httptools,
the parser uvicorn uses) read the answer, for about 50. With a webhook per Debit, that difference
is a fifth of what the service spends on a Debit (docs/benchmarks.md, "Webhook deliveries: as
cheap as their POST").

What it keeps of aiohttp's client: the egress policy at every connection (every address a name
resolves to is checked, IP literals too), TLS with the system's verification for ``https``,
redirects never followed (a 3xx is just a status), one deadline for connecting, writing and
reading. At most 8 connections a receiver and 256 in all are kept idle (past that, the one idle
the longest is closed: a deployment of many stores has a receiver per store). A connection is
reused only after a complete answer that allows it, and never once the receiver has closed it;
like aiohttp's, a POST is not sent twice by the client itself (a connection the receiver closes
just as the POST goes out is a failed attempt, retried later).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import httptools

from hub.providers.egress import EgressPolicy

IDLE_PER_ORIGIN_MAX = 8  # kept-alive connections per receiver (the deliverer runs a few subscriptions at once)
IDLE_MAX = 256  # in all: past it, the connection idle the longest is closed (a socket each, per store's receiver)


class ProtocolError(OSError):
    """The receiver's answer was not HTTP/1.x."""


@dataclass(frozen=True)
class Target:
    """Where a URL's requests go, and the start of each request to it."""

    scheme: str
    host: str
    port: int
    request_line_and_host: bytes

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


@lru_cache(maxsize=1024)
def target_of(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a webhook url is http:// or https:// with a host")
    default_port = 443 if parts.scheme == "https" else 80
    port = parts.port or default_port
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in path):
        raise ValueError("a webhook url's path holds no spaces or control characters")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # an IPv6 literal keeps its brackets
    host_header = host if port == default_port else f"{host}:{port}"
    start = f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n".encode("ascii")
    return Target(parts.scheme, parts.hostname, port, start)


class _Connection(asyncio.Protocol):
    """One kept-alive connection: sends a request, resolves its answer's status."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[int] | None = None
        self.received_any = False
        self.status: int | None = None  # the final answer's, once its headers are read
        self.reusable = False
        self.closed = False

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ProtocolError(f"not an HTTP answer: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.status is not None:  # a body that ends with the connection (HTTP/1.0), or cut short:
            self._answered(self.status)  # the status was said, and it is all a delivery needs
            return
        when = "mid-answer" if self.received_any else "before answering"
        self._fail(ConnectionResetError(f"the receiver closed the connection {when}"))

    # ---- httptools callbacks ----

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:  # not an interim answer (100 Continue, 103 Early Hints): the final one follows
            self.status = status

    def on_message_complete(self) -> None:
        if self.status is None:
            return
        self.reusable = self.parser.should_keep_alive()
        self._answered(self.status)

    # ----

    async def post(self, request: bytes) -> int:
        if self.transport is None or self.closed:
            raise ConnectionResetError("the connection is closed")
        self.answer = asyncio.get_running_loop().create_future()
        self.received_any = False
        self.status = None
        self.reusable = False
        self.transport.write(request)
        return await self.answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _answered(self, status: int) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(status)

    def _fail(self, error: Exception) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(error)


class WebhookClient:
    """POSTs bodies to receivers, keeping their connections alive between deliveries."""

    def __init__(self, policy: EgressPolicy, user_agent: str) -> None:
        self.policy = policy
        self.user_agent = f"User-Agent: {user_agent}\r\n".encode("ascii")
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._idle_order: OrderedDict[_Connection, tuple[str, str, int]] = OrderedDict()  # longest idle first
        self._tls: ssl.SSLContext | None = None

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> int:
        """The receiver's status for one POST; raises OSError (or TimeoutError) when there is none."""
        target = target_of(url)
        request = b"".join((target.request_line_and_host, self.user_agent, _header_lines(headers, len(body)), body))
        async with asyncio.timeout(timeout_s):
            connection = self._take_idle(target) or await self._connect(target)
            return await self._exchange(target, connection, request)

    @property
    def idle_connections(self) -> int:
        return len(self._idle_order)

    async def close(self) -> None:
        for connection in self._idle_order:
            connection.close()
        self._idle.clear()
        self._idle_order.clear()

    async def _exchange(self, target: Target, connection: _Connection, request: bytes) -> int:
        try:
            status = await connection.post(request)
        except BaseException:
            connection.close()
            raise
        if connection.reusable and not connection.closed:
            self._keep_idle(target.origin, connection)
        else:
            connection.close()
        return status

    def _keep_idle(self, origin: tuple[str, str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= IDLE_PER_ORIGIN_MAX:
            connection.close()
            return
        if len(self._idle_order) >= IDLE_MAX:
            oldest, its_origin = self._idle_order.popitem(last=False)
            self._idle[its_origin].remove(oldest)
            if not self._idle[its_origin]:
                del self._idle[its_origin]
            oldest.close()
        idle.append(connection)
        self._idle_order[connection] = origin

    def _take_idle(self, target: Target) -> _Connection | None:
        idle = self._idle.get(target.origin)
        while idle:
            connection = idle.pop()
            del self._idle_order[connection]
            if not connection.closed:
                return connection
        return None

    async def _connect(self, target: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if target.scheme == "https" else None
        last_error: OSError | None = None
        for address in await self._permitted_addresses(target):
            try:
                _, connection = await loop.create_connection(
                    _Connection, address, target.port, ssl=tls, server_hostname=target.host if tls else None
                )
            except OSError as e:
                last_error = e
                continue
            return connection  # asyncio's TCP transports set TCP_NODELAY themselves
        raise last_error or OSError(f"{target.host} has no address to connect to")

    async def _permitted_addresses(self, target: Target) -> list[str]:
        """The receiver's addresses the egress policy allows (the rule aiohttp's GuardedResolver applies)."""
        try:
            ipaddress.ip_address(target.host)
            addresses = [target.host]  # an IP literal: no lookup, the same check
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        return self.policy.addresses_allowed(target.host, addresses)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


def _header_lines(headers: Mapping[str, str], body_length: int) -> bytes:
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    for line in lines:
        if "\n" in line[:-2] or "\r" in line[:-2]:
            raise ValueError("a header holds a line break")
    lines.append(f"Content-Length: {body_length}\r\n\r\n")
    return "".join(lines).encode("latin-1")
