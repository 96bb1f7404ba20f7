"""A webhook delivery's CPU: the deliverer's own client beside aiohttp's, on one event loop.

Both POST the same signed-size body with the deliverer's headers, one request at a time (as a
subscription is delivered), to the benchmarks' webhook sink (``bench.webhook_sink``, a process of
its own on loopback), so that the client's process pays for the client alone. The two
take turns, ``--rounds`` times; each turn is a warm-up, then ``--posts`` POSTs timed by the
process's CPU clock (``time.process_time``) and the wall clock. A figure is the median turn.

    python -m bench.webhook_client
    python -m bench.webhook_client --loop uvloop --posts 8000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.report import write_json
from bench.webhook_sink import running_sink
from hub.providers.egress import EgressPolicy
from hub.webhooks.client import WebhookClient
from hub.webhooks.signing import signed_headers

BODY = b'{"id":123456,"type":"card.debited","cardId":"' + b"c" * 36 + b'","amount":"1.00"' + b" " * 400 + b"}"
SECRET = "whsec_" + "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="
WARMUP_POSTS = 300
LOOPBACK = EgressPolicy(("127.0.0.0/8",))

Post = Callable[[], Awaitable[int]]


def _headers() -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Giftcard-Event": "card.debited",
        **signed_headers([SECRET], 123456, int(time.time()), BODY),
    }


async def _timed(post: Post, posts: int) -> tuple[float, float]:
    for _ in range(WARMUP_POSTS):
        await post()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(posts):
        status = await post()
        if status != 204:
            raise RuntimeError(f"the sink answered {status}")
    return (time.process_time() - cpu) / posts * 1e6, (time.perf_counter() - wall) / posts * 1e6


async def turn_aiohttp(url: str, posts: int) -> tuple[float, float]:
    """As the deliverer posted before: a session with the egress-checking connector's settings."""
    headers = _headers()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(headers={"User-Agent": "giftcard-webhooks/1"}) as session:

        async def post() -> int:
            async with session.post(url, data=BODY, headers=headers, allow_redirects=False, timeout=timeout) as r:
                return r.status

        return await _timed(post, posts)


async def turn_ours(url: str, posts: int) -> tuple[float, float]:
    headers = _headers()
    client = WebhookClient(LOOPBACK, "giftcard-webhooks/1")
    try:
        return await _timed(lambda: client.post(url, headers, BODY, 10.0), posts)
    finally:
        await client.close()


CONTENDERS = {"aiohttp": turn_aiohttp, "ours": turn_ours}


def run(args: argparse.Namespace) -> dict[str, Any]:
    runner = uvloop.run if args.loop == "uvloop" else asyncio.run
    turns: dict[str, list[tuple[float, float]]] = {name: [] for name in CONTENDERS}
    with running_sink() as sink:
        for _ in range(args.rounds):
            for name, turn in CONTENDERS.items():
                turns[name].append(runner(turn(sink.url, args.posts)))
    figures = {
        name: {
            "cpu_us_per_post": statistics.median(cpu for cpu, _ in measured),
            "wall_us_per_post": statistics.median(wall for _, wall in measured),
            "cpu_us_each_round": [round(cpu, 1) for cpu, _ in measured],
        }
        for name, measured in turns.items()
    }
    figures["ratio_cpu_ours_to_aiohttp"] = figures["ours"]["cpu_us_per_post"] / figures["aiohttp"]["cpu_us_per_post"]
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=4000, help="timed POSTs per turn (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="turns of each client (default %(default)s)")
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the event loop (default: serve's background process's)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = run(args)
    print(f"| client | CPU µs per POST (median of {args.rounds}) | wall µs per POST | CPU each round |")
    print("|---|--:|--:|---|")
    for name in CONTENDERS:
        f = figures[name]
        print(f"| {name} | {f['cpu_us_per_post']:.0f} | {f['wall_us_per_post']:.0f} | {f['cpu_us_each_round']} |")
    print(f"ours / aiohttp, CPU per POST: {figures['ratio_cpu_ours_to_aiohttp']:.2f}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
