"""A faulty gift card provider: the reference provider behind faults switchable at runtime.

Faults apply to every route or to one route (named by its Provider Protocol operationId), for
ever or for the next ``times`` requests, and can be healed while the server runs, so a hub's
timeouts, retries and circuit breaker (open, then recover) can be tested::

    from tests.providers.faulty import Fault, start_faulty_provider

    async with start_faulty_provider() as provider:
        provider.faults.set(Fault.HTTP_500)                          # every route fails
        provider.faults.set(Fault.SLOW, route="GetGiftCardbyID", slow_s=2.0)
        provider.faults.set(Fault.RESET, route="ListAllGiftCards", times=3)  # then healthy again
        provider.faults.heal()                                        # all healthy

When healthy (or once a fault is used up) it answers exactly as the reference provider does, from
``provider.state``. Faults are injected before authentication: a broken server does not check
credentials. Every request is still recorded in ``provider.state.requests``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pytest
from aiohttp import web

from tests.providers.reference import (
    OPERATION_IDS,
    PREFIX,
    Handler,
    ProviderState,
    RunningProvider,
    build_app,
    json_response,
)
from tests.providers.serving import serve

DEFAULT_SLOW_S = 2.0  # longer than any timeout a test should configure for a hub's provider calls
MAX_SLOW_S = 30.0  # bound, so a forgotten slow fault cannot hang the suite

# Valid JSON that matches no Provider Protocol response: a non-array for list routes, and wrong
# types (or a missing required field) for every object route.
WRONG_SHAPE_BODY = {"id": 12345, "cardId": 7, "balance": "a lot", "oid": None, "value": "a lot"}
MALFORMED_JSON_BODY = b'{"id": "1", "balance": '  # cut off mid-document
DEEP_JSON_BODY = b"[" * 1100 + b"]" * 1100  # deeper than Python's recursion limit


class Fault(StrEnum):
    HEALTHY = "healthy"  # answer as the reference provider does
    SLOW = "slow"  # sleep slow_s, then answer normally
    HTTP_500 = "http_500"  # 500 with a JSON error body
    MALFORMED_JSON = "malformed_json"  # 200, application/json, body is not JSON
    WRONG_SHAPE = "wrong_shape"  # 200, valid JSON of the wrong shape
    DEEP_JSON = "deep_json"  # 200, valid JSON nested 1,100 levels deep
    RESET = "reset"  # TCP reset: the connection drops without a response


@dataclass
class FaultRule:
    fault: Fault
    remaining: int | None  # requests left before the rule expires; None = until changed
    slow_s: float


@dataclass
class FaultPlan:
    """Which fault each route serves. A route rule wins over the global one; both can change any time."""

    slow_s: float = DEFAULT_SLOW_S
    served: list[tuple[str | None, Fault]] = field(default_factory=list)  # (route, fault) per injected fault
    _global: FaultRule | None = field(default=None, init=False)
    _routes: dict[str, FaultRule] = field(default_factory=dict, init=False)

    def set(
        self, fault: Fault, *, route: str | None = None, times: int | None = None, slow_s: float | None = None
    ) -> None:
        """Serve ``fault`` on ``route`` (an operationId; None = every route) for ``times`` requests."""
        if route is not None and route not in OPERATION_IDS:
            raise ValueError(f"unknown route {route!r}; routes are the operationIds {OPERATION_IDS}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        rule = FaultRule(fault, times, _bounded(self.slow_s if slow_s is None else slow_s))
        if route is None:
            self._global = rule
        else:
            self._routes[route] = rule

    def heal(self, route: str | None = None) -> None:
        """Back to healthy: one route, or (route=None) everything, route rules included."""
        if route is None:
            self._global = None
            self._routes.clear()
        else:
            self._routes.pop(route, None)

    def take(self, route: str | None) -> FaultRule | None:
        """The rule for this request, counting it against ``times``; None when healthy."""
        rule = self._routes.get(route) if route is not None else None
        if rule is None:
            rule = self._global
        if rule is None:
            return None
        if rule.remaining is not None:
            rule.remaining -= 1
            if rule.remaining == 0:
                self._expire(route, rule)
        return rule

    def _expire(self, route: str | None, rule: FaultRule) -> None:
        if self._global is rule:
            self._global = None
        elif route is not None and self._routes.get(route) is rule:
            del self._routes[route]


def _bounded(slow_s: float) -> float:
    if not 0 < slow_s <= MAX_SLOW_S:
        raise ValueError(f"slow_s must be in (0, {MAX_SLOW_S}] seconds, got {slow_s}")
    return slow_s


# --------------------------------------------------------------------------------------------
# Serving faults

FaultHandler = Callable[[web.Request, Handler, FaultRule], Awaitable[web.StreamResponse]]


async def _slow(request: web.Request, handler: Handler, rule: FaultRule) -> web.StreamResponse:
    await asyncio.sleep(rule.slow_s)
    return await handler(request)


async def _http_500(request: web.Request, handler: Handler, rule: FaultRule) -> web.StreamResponse:
    return json_response({"error": "injected fault: internal server error"}, status=500)


async def _malformed_json(request: web.Request, handler: Handler, rule: FaultRule) -> web.StreamResponse:
    return web.Response(body=MALFORMED_JSON_BODY, content_type="application/json")


async def _wrong_shape(request: web.Request, handler: Handler, rule: FaultRule) -> web.StreamResponse:
    return json_response(WRONG_SHAPE_BODY)


async def _deep_json(request: web.Request, handler: Handler, rule: FaultRule) -> web.StreamResponse:
    return web.Response(body=DEEP_JSON_BODY, content_type="application/json")


async def _reset(request: web.Request, handler: Handler, rule: FaultRule) -> web.StreamResponse:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        # Linger 0 makes close() send RST instead of FIN: the client sees "connection reset".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if transport is not None:
        transport.abort()
    # Nothing can be written any more; cancelling ends the handler without aiohttp logging an error.
    raise asyncio.CancelledError


_FAULT_HANDLERS: dict[Fault, FaultHandler] = {
    Fault.SLOW: _slow,
    Fault.HTTP_500: _http_500,
    Fault.MALFORMED_JSON: _malformed_json,
    Fault.WRONG_SHAPE: _wrong_shape,
    Fault.DEEP_JSON: _deep_json,
    Fault.RESET: _reset,
}


def inject_faults(plan: FaultPlan) -> Any:
    """Middleware serving ``plan``'s faults; healthy requests go on to the reference provider."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name
        rule = plan.take(route)
        if rule is None or rule.fault is Fault.HEALTHY:
            return await handler(request)
        plan.served.append((route, rule.fault))
        return await _FAULT_HANDLERS[rule.fault](request, handler, rule)

    return middleware


@dataclass(frozen=True)
class RunningFaultyProvider(RunningProvider):
    faults: FaultPlan = field(default_factory=FaultPlan)


@asynccontextmanager
async def start_faulty_provider(
    *,
    prefix: str = PREFIX,
    slow_s: float = DEFAULT_SLOW_S,
    state: ProviderState | None = None,
    **state_options: Any,
) -> AsyncIterator[RunningFaultyProvider]:
    """Serve a faulty provider (healthy until told otherwise) on 127.0.0.1 with an ephemeral port."""
    state = state or ProviderState(**state_options)
    plan = FaultPlan(slow_s=_bounded(slow_s))
    async with serve(build_app(state, prefix=prefix, middlewares=[inject_faults(plan)])) as base_url:
        yield RunningFaultyProvider(base_url, prefix, state, plan)


@pytest.fixture
async def faulty_provider() -> AsyncIterator[RunningFaultyProvider]:
    """A fresh, initially healthy faulty provider per test; import this name into a test module."""
    async with start_faulty_provider() as provider:
        yield provider
