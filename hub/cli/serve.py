"""``giftcard serve``: the HTTP service, its worker processes and the projection runner beside them."""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from multiprocessing.connection import Connection

import msgspec
import uvloop
from aiohttp import web

from hub.app import create_app
from hub.cli.projections import run_beside_serve
from hub.config import Settings
from hub.http.server import serve_until_signalled
from hub.logs import JsonAccessLogger, LogSetup, configure_logging, current_log_setup
from hub.supervisor import SERVING, Supervisor
from ledger.postgres.database import resolve_database_url

BACKGROUND_NICENESS = 10  # requests first: read models and webhooks may lag a busy second, a Debit may not
WORKER_STOP_MARGIN_S = 5.0


def add_commands(commands: argparse._SubParsersAction) -> None:
    serve_cmd = commands.add_parser("serve", help="run the HTTP service in the foreground")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve_cmd.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port; one per core uses every core (default 1)"
    )
    serve_cmd.set_defaults(run=serve)


def serve(args: argparse.Namespace) -> int:
    settings = args.settings
    url, embedded = resolve_database_url(settings.database)
    print(
        f"giftcard serving on http://{args.host}:{args.port} ({args.workers} process(es))", file=sys.stderr, flush=True
    )
    runner = start_background(settings, url) if settings.run_projections or settings.run_webhooks else None
    # The background process has the projections and the webhooks; the workers know of each other
    # (see Ledger's shared_cards).
    web_settings = msgspec.structs.replace(settings, run_projections=False, run_webhooks=False, workers=args.workers)
    try:
        if args.workers == 1:
            run_worker(web_settings, url, args.host, args.port, reuse_port=False)
            status = 0
        else:
            status = run_workers(web_settings, url, args.host, args.port, args.workers)
    finally:
        if runner is not None:
            stop_process(runner)
        if embedded is not None:
            embedded.stop()
    return status


def start_background(settings: Settings, url: str) -> multiprocessing.Process:
    """The read models' runner and the webhook deliveries beside the web workers, so no request
    waits behind a batch or a delivery."""
    runner = multiprocessing.get_context("spawn").Process(
        target=_background_main,
        args=(url, settings, os.getpid(), current_log_setup()),
        name="giftcard-background",
        daemon=True,
    )
    runner.start()
    return runner


def _background_main(url: str, settings: Settings, serve_pid: int, log_setup: LogSetup) -> None:
    configure_logging(log_setup.level, readable=log_setup.readable)
    os.nice(BACKGROUND_NICENESS)
    run_beside_serve(url, settings, serve_pid)


def stop_process(process: multiprocessing.Process, timeout_s: float = 10.0) -> None:
    if process.is_alive():
        os.kill(process.pid, signal.SIGTERM)  # its batch in flight rolls back; the next run redoes it
    process.join(timeout_s)
    if process.is_alive():
        process.kill()


def run_worker(
    settings: Settings,
    url: str,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    on_serving: Callable[[asyncio.Event], None] | None = None,
) -> None:
    app = create_app(settings, url)
    app.on_startup.append(freeze_startup_objects)
    # libuv's loop: 7 % less server CPU per Debit than asyncio's in back-to-back runs
    # (docs/benchmarks.md), and at 16 connections the server is CPU-bound on its one core.
    uvloop.run(
        serve_until_signalled(
            app,
            host,
            port,
            reuse_port=reuse_port,
            shutdown_timeout_s=settings.shutdown_timeout_s,
            access_log_class=JsonAccessLogger,
            on_serving=on_serving,
        )
    )


# The collector's first threshold: allocations (net of frees) of tracked objects between two young
# collections. At the default 700, the ~2,000 objects that 16 Debits in flight hold are walked every
# few dozen Debits (3 to 11 µs of CPU per Debit in docs/benchmarks.md); at 10,000 a young collection
# comes about twenty times less often and costs no more, since it walks only what is still alive.
YOUNG_COLLECTION_ALLOCATIONS = 10_000


async def freeze_startup_objects(app: web.Application) -> None:
    """What start-up allocated (modules, routes, pools) lives as long as the process: moved out of
    the garbage collector's sight, a full collection under load walks only what requests create."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_ALLOCATIONS, *gc.get_threshold()[1:])


def run_workers(settings: Settings, url: str, host: str, port: int, count: int) -> int:
    """Several processes on one port (SO_REUSEPORT): the kernel spreads connections over them,
    and ``hub.supervisor`` keeps them running (replaced when one dies, all replaced on SIGHUP).

    They share nothing but the database, which is all the ledger needs: every
    invariant is checked against the card's stream at append time.
    """
    # Every worker writes its metrics here, so whichever answers /metrics answers for all.
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="giftcard-metrics-"))
    # A worker drains within its shutdown timeout; the margin is its start-up, if SIGTERM comes then.
    stop_timeout_s = settings.shutdown_timeout_s + WORKER_STOP_MARGIN_S
    return Supervisor(
        _worker_main, (settings, url, host, port, current_log_setup()), count, stop_timeout_s=stop_timeout_s
    ).run()


def _worker_main(
    settings: Settings, url: str, host: str, port: int, log_setup: LogSetup, supervisor: Connection
) -> None:
    configure_logging(log_setup.level, readable=log_setup.readable)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor's to act on: it replaces this process
    run_worker(settings, url, host, port, reuse_port=True, on_serving=report_to(supervisor))


def report_to(supervisor: Connection) -> Callable[[asyncio.Event], None]:
    """Tells the supervisor this worker serves, and stops the worker when the supervisor is gone."""

    def on_serving(stop: asyncio.Event) -> None:
        supervisor.send_bytes(SERVING)
        loop = asyncio.get_running_loop()

        def supervisor_gone() -> None:  # it never writes: readable means its end closed
            loop.remove_reader(supervisor.fileno())
            stop.set()

        loop.add_reader(supervisor.fileno(), supervisor_gone)

    return on_serving
