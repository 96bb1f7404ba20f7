"""The ``giftcard`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys

import asyncpg
from aiohttp import web

from hub.app import create_app
from hub.config import Settings
from ledger.database import resolve_database_url
from ledger.migrate import upgrade

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    url, embedded = resolve_database_url()
    print(
        f"giftcard serving on http://{args.host}:{args.port} ({args.workers} process(es))", file=sys.stderr, flush=True
    )
    try:
        if args.workers == 1:
            run_worker(settings, url, args.host, args.port, reuse_port=False)
        else:
            run_workers(settings, url, args.host, args.port, args.workers)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def run_worker(settings: Settings, url: str, host: str, port: int, *, reuse_port: bool) -> None:
    # run_app stops accepting on SIGINT/SIGTERM and lets in-flight requests finish.
    web.run_app(
        create_app(settings, url),
        host=host,
        port=port,
        reuse_port=reuse_port,
        shutdown_timeout=settings.shutdown_timeout_s,
        print=None,
        access_log_format='%a "%r" %s %b %Tfs',
    )


def run_workers(settings: Settings, url: str, host: str, port: int, count: int) -> None:
    """Several processes on one port (SO_REUSEPORT): the kernel spreads connections over them.

    They share nothing but the database, which is all the ledger needs: every
    invariant is checked against the card's stream at append time.
    """
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker_main, args=(settings, url, host, port), name=f"giftcard-worker-{n}")
        for n in range(count)
    ]
    for worker in workers:
        worker.start()

    def stop(signum: int, frame: object) -> None:
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.join()


def _worker_main(settings: Settings, url: str, host: str, port: int) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    run_worker(settings, url, host, port, reuse_port=True)


def db_upgrade(args: argparse.Namespace) -> int:
    async def run() -> list[str]:
        connection = await asyncpg.connect(url)
        try:
            return await upgrade(connection)
        finally:
            await connection.close()

    url, embedded = resolve_database_url()
    try:
        applied = asyncio.run(run())
    finally:
        if embedded is not None:
            embedded.stop()
    print("applied: " + ", ".join(applied) if applied else "database schema is current")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="giftcard", description="Gift card hub and event-sourced native provider")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the HTTP service in the foreground")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve_cmd.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port; one per core uses every core (default 1)"
    )
    serve_cmd.set_defaults(run=serve)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply pending migrations (serve does this at start)").set_defaults(
        run=db_upgrade
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
