"""Serve an aiohttp application on loopback for the duration of an ``async with``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

LOOPBACK = "127.0.0.1"

# A test server must not keep the suite waiting on handlers that are deliberately slow.
SHUTDOWN_TIMEOUT_S = 0.5


@asynccontextmanager
async def serve(app: web.Application, host: str = LOOPBACK) -> AsyncIterator[str]:
    """Run ``app`` on ``host`` with a port the OS picks; yield its base URL (no trailing slash)."""
    # handler_cancellation: when a client gives up (timeout, reset), stop its handler too, as a
    # real server would, instead of letting a slow fault sleep on after the test has moved on.
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
