"""A webhook receiver for the benchmarks: answers every delivery 204 and counts them.

It runs in a process of its own, on uvloop, so the service under test delivers its events as it
would in production (``serve`` with a subscription), to a receiver that costs the machine as
little as it can: in production the receiver is somebody else's machine, and every core-second
it takes here is taken from the server being measured. (As a thread of the benchmark's own
process, on asyncio, it cost 15 to 25 % more CPU per delivery, and shared that process's GIL
with the measurements.)
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized

import uvloop
from aiohttp import web

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0


class Sink:
    def __init__(self, url: str, count: Synchronized) -> None:
        self.url = url
        self._count = count

    @property
    def deliveries(self) -> int:
        return self._count.value


def _serve(count: Synchronized, started: Connection) -> None:
    async def receive(request: web.Request) -> web.Response:
        await request.read()
        count.value += 1  # this process is the only writer
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        started.send(f"http://{HOST}:{runner.addresses[0][1]}/giftcard-events")
        await asyncio.Event().wait()  # until the benchmark terminates this process

    uvloop.run(main())


@contextmanager
def running_sink() -> Iterator[Sink]:
    """The sink, serving on a free loopback port until the block ends."""
    context = multiprocessing.get_context("spawn")
    count = context.Value("q", 0)
    started, started_child = context.Pipe(duplex=False)
    process = context.Process(target=_serve, args=(count, started_child), name="webhook-sink", daemon=True)
    process.start()
    try:
        if not started.poll(START_TIMEOUT_S):
            raise RuntimeError("the webhook sink did not start")
        yield Sink(started.recv(), count)
    finally:
        process.terminate()
        process.join(10)
