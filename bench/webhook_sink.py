"""A webhook receiver for the benchmarks: answers every delivery 204 and counts them.

It runs in a process of its own, on uvloop, so the service under test delivers its events as it
would in production (``serve`` with a subscription), to a receiver that costs the machine as
little as it can: in production the receiver is somebody else's machine, and every core-second
it takes here is taken from the server being measured. So it is an HTTP/1.1 protocol of a few
lines over llhttp (httptools), not a web framework: as an aiohttp application it cost about 0.2 of
a core at 800 deliveries a second on a 2-core machine, a tenth of the machine, all of it taken
from the server being measured. (As a thread of the benchmark's own process, on asyncio, it cost
15 to 25 % more again, and shared that process's GIL with the measurements.)
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized

import httptools
import uvloop

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Sink:
    def __init__(self, url: str, count: Synchronized) -> None:
        self.url = url
        self._count = count

    @property
    def deliveries(self) -> int:
        return self._count.value


class _Receiver(asyncio.Protocol):
    """One connection: every complete POST is counted and answered 204, in order, kept alive
    unless the deliverer asked to close."""

    def __init__(self, count: Synchronized) -> None:
        self._count = count
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.write(BAD_REQUEST)
            self._transport.close()

    def on_message_complete(self) -> None:
        assert self._transport is not None
        self._count.value += 1  # this process is the only writer
        self._transport.write(NO_CONTENT)
        if not self._parser.should_keep_alive():
            self._transport.close()


def _serve(count: Synchronized, started: Connection) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Receiver(count), HOST, 0)
        port = server.sockets[0].getsockname()[1]
        started.send(f"http://{HOST}:{port}/giftcard-events")
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
