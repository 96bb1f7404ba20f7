"""A webhook receiver for the benchmarks: answers every delivery 204 and counts them.

It runs on an event loop of its own in a thread of the benchmark's process, so the service under
test delivers its events as it would in production (``serve`` with a subscription), to a receiver
that costs it nothing but the delivery itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

HOST = "127.0.0.1"


class Sink:
    def __init__(self) -> None:
        self.deliveries = 0
        self.url = ""

    async def receive(self, request: web.Request) -> web.Response:
        await request.read()
        self.deliveries += 1
        return web.Response(status=204)


@contextmanager
def running_sink() -> Iterator[Sink]:
    """The sink, serving on a free loopback port until the block ends."""
    sink = Sink()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner: web.AppRunner | None = None

    async def start() -> None:
        nonlocal runner
        app = web.Application()
        app.router.add_post("/{tail:.*}", sink.receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        sink.url = f"http://{HOST}:{site._server.sockets[0].getsockname()[1]}/giftcard-events"
        started.set()

    thread = threading.Thread(target=loop.run_forever, name="webhook-sink", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    started.wait(10)
    try:
        yield sink
    finally:
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
