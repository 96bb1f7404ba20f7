"""The conventional baseline: the eventsourcing library's stock PostgreSQL application.

What a developer gets by following the library's documentation: an ``Aggregate`` with a command
method that checks the rule and an ``@event`` method that applies the fact, an ``Application``
that loads the aggregate with ``repository.get`` and stores its new events with ``save``
(``PERSISTENCE_MODULE=eventsourcing.postgres``, psycopg, synchronous). The library is blocking,
so each request runs on a thread pool through ``loop.run_in_executor``. Idempotency by requestId
lives in the aggregate, as in our service. Snapshots are taken every 100 events, as our service
does, so neither side pays for replaying a long history.

    python -m bench.baselines.eventsourcing_app --port 8081 --database-url postgresql://postgres@127.0.0.1/db
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError

from bench.baselines.common import Refused, add_routes, credentials, make_middlewares, serve_from_command_line

T = TypeVar("T")

SNAPSHOT_INTERVAL_EVENTS = 100  # the service's own interval (ledger.application.commands.SNAPSHOT_INTERVAL_EVENTS)
CONFLICT_RETRIES_MAX = 25
CONFLICT_BACKOFF_S = 0.002


class Card(Aggregate):
    @event("Issued")
    def __init__(self) -> None:
        self.balance = 0
        self.requests: dict[str, list[Any]] = {}  # requestId -> [transaction id, operation, cents]

    def debit(self, cents: int, request_id: str, description: str) -> str:
        replayed = self._replayed(request_id, "Debit", cents)
        if replayed is not None:
            return replayed
        if cents > self.balance:
            raise Refused(422, "insufficient_funds", f"card {self.id} has {self.balance} cents, {cents} requested")
        transaction_id = uuid.uuid4().hex
        self._debited(transaction_id=transaction_id, cents=cents, request_id=request_id, description=description)
        return transaction_id

    def credit(self, cents: int, request_id: str) -> str:
        replayed = self._replayed(request_id, "Credit", cents)
        if replayed is not None:
            return replayed
        transaction_id = uuid.uuid4().hex
        self._credited(transaction_id=transaction_id, cents=cents, request_id=request_id)
        return transaction_id

    @event("Debited")
    def _debited(self, transaction_id: str, cents: int, request_id: str, description: str) -> None:
        self.balance -= cents
        self.requests[request_id] = [transaction_id, "Debit", cents]

    @event("Credited")
    def _credited(self, transaction_id: str, cents: int, request_id: str) -> None:
        self.balance += cents
        self.requests[request_id] = [transaction_id, "Credit", cents]

    def _replayed(self, request_id: str, operation: str, cents: int) -> str | None:
        first = self.requests.get(request_id)
        if first is None:
            return None
        if first[1:] != [operation, cents]:
            raise Refused(409, "request_id_reused", f"requestId {request_id!r} was used for a different request")
        return first[0]


class GiftCards(Application):
    snapshotting_intervals = {Card: SNAPSHOT_INTERVAL_EVENTS}

    def debit(self, card_id: str, cents: int, request_id: str, description: str) -> str:
        return self._command(card_id, lambda card: card.debit(cents, request_id, description))

    def credit(self, card_id: str, cents: int, request_id: str) -> str:
        return self._command(card_id, lambda card: card.credit(cents, request_id))

    def issue(self, cents: int) -> str:
        card = Card()
        card.credit(cents, "seed")
        self.save(card)
        return str(card.id)

    def _command(self, card_id: str, decide: Callable[[Card], T]) -> T:
        """Load, decide, save; a lost race (another thread saved first) reloads and decides again."""
        try:
            aggregate_id = uuid.UUID(card_id)
        except ValueError:
            raise Refused(404, "card_not_found", f"gift card {card_id!r} not found") from None
        for attempt in range(CONFLICT_RETRIES_MAX):
            try:
                card = self.repository.get(aggregate_id)
            except AggregateNotFoundError:
                raise Refused(404, "card_not_found", f"gift card {card_id!r} not found") from None
            result = decide(card)
            try:
                self.save(card)
            except IntegrityError:
                time.sleep(random.uniform(0, CONFLICT_BACKOFF_S * 2**attempt))
                continue
            return result
        raise Refused(409, "concurrent_update", f"card {card_id} is changing too fast; retry the request")


def library_env(database_url: str, pool_size: int) -> dict[str, str]:
    parts = urlsplit(database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/"),
        # An embedded server listens on a Unix socket, named by ``?host=`` in its URL.
        "POSTGRES_HOST": parse_qs(parts.query).get("host", [None])[0] or parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "postgres",
        "POSTGRES_PASSWORD": parts.password or "",
        # One connection per executor thread, as many as the other servers get: the stock
        # default (5 + 10 overflow) would make threads queue for a connection.
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": "0",
    }


def create_app(args: argparse.Namespace) -> web.Application:
    app = web.Application(middlewares=make_middlewares(*credentials()))
    state: dict[str, Any] = {}

    async def library(app: web.Application) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(max_workers=args.pool_size, thread_name_prefix="es")
        application = await asyncio.get_running_loop().run_in_executor(
            executor, functools.partial(GiftCards, env=library_env(args.database_url, args.pool_size))
        )
        state.update(executor=executor, app=application)
        try:
            yield
        finally:
            executor.shutdown(wait=True)
            application.close()

    async def in_thread(function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(state["executor"], function, *args)

    async def debit(card_id: str, cents: int, request_id: str, description: str) -> str:
        return await in_thread(state["app"].debit, card_id, cents, request_id, description)

    async def credit(card_id: str, cents: int, request_id: str) -> str:
        return await in_thread(state["app"].credit, card_id, cents, request_id)

    async def seed(cards: int, cents: int) -> list[str]:
        return list(await asyncio.gather(*(in_thread(state["app"].issue, cents) for _ in range(cards))))

    app.cleanup_ctx.append(library)
    add_routes(app, debit=debit, credit=credit, seed=seed)
    return app


def main(argv: list[str] | None = None) -> int:
    return serve_from_command_line(__doc__, create_app, argv)


if __name__ == "__main__":
    sys.exit(main())
