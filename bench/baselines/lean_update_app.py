"""The lean baseline: a balance column and one guarded UPDATE per Debit, no history.

Each Debit is one transaction: insert the idempotency row (unique per card and requestId), then
``update cards set balance = balance - $1 where id = $2 and balance >= $1``. A repeated
requestId returns the first answer; a balance too low is a 422. Nothing else is kept: this is the
least work PostgreSQL can do for a correct, idempotent authorization, so the ceiling.

    python -m bench.baselines.lean_update_app --port 8082 --database-url postgresql://postgres@127.0.0.1/db
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from bench.baselines.common import Refused, add_routes, credentials, make_middlewares, serve_from_command_line

SCHEMA = """
create table if not exists cards (
    id      uuid primary key,
    balance bigint not null check (balance >= 0)
);
create table if not exists requests (
    card_id        uuid   not null,
    request_id     text   not null,
    transaction_id uuid   not null,
    operation      text   not null,
    value          bigint not null,
    unique (card_id, request_id)
);
"""

_CLAIM = """
insert into requests (card_id, request_id, transaction_id, operation, value) values ($1, $2, $3, $4, $5)
on conflict (card_id, request_id) do nothing
returning transaction_id
"""
_DEBIT = "update cards set balance = balance - $1 where id = $2 and balance >= $1 returning balance"
_CREDIT = "update cards set balance = balance + $1 where id = $2 returning balance"
_FIRST_ANSWER = "select transaction_id, operation, value from requests where card_id = $1 and request_id = $2"


class _Replay(Exception):
    """The requestId was already used: roll back the claim attempt and answer what was recorded."""


def card_uuid(card_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(card_id)
    except ValueError:
        raise Refused(404, "card_not_found", f"gift card {card_id!r} not found") from None


class LeanLedger:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def apply(self, card_id: str, operation: str, statement: str, cents: int, request_id: str) -> str:
        card = card_uuid(card_id)
        transaction_id = uuid.uuid4()
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                if await connection.fetchval(_CLAIM, card, request_id, transaction_id, operation, cents) is None:
                    raise _Replay
                if await connection.fetchval(statement, cents, card) is None:
                    raise await self._refusal(connection, card, cents)
        except _Replay:
            return await self._first_answer(card, request_id, operation, cents)
        return transaction_id.hex

    async def debit(self, card_id: str, cents: int, request_id: str, description: str) -> str:
        return await self.apply(card_id, "Debit", _DEBIT, cents, request_id)

    async def credit(self, card_id: str, cents: int, request_id: str) -> str:
        return await self.apply(card_id, "Credit", _CREDIT, cents, request_id)

    @staticmethod
    async def _refusal(connection: asyncpg.Connection, card: uuid.UUID, cents: int) -> Refused:
        balance = await connection.fetchval("select balance from cards where id = $1", card)
        if balance is None:
            return Refused(404, "card_not_found", f"gift card {card} not found")
        return Refused(422, "insufficient_funds", f"card {card} has {balance} cents available, {cents} requested")

    async def _first_answer(self, card: uuid.UUID, request_id: str, operation: str, cents: int) -> str:
        row = await self.pool.fetchrow(_FIRST_ANSWER, card, request_id)
        if row["operation"] != operation or row["value"] != cents:
            raise Refused(409, "request_id_reused", f"requestId {request_id!r} was used for a different request")
        return row["transaction_id"].hex

    async def seed(self, cards: int, cents: int) -> list[str]:
        ids = [uuid.uuid4() for _ in range(cards)]
        await self.pool.executemany("insert into cards (id, balance) values ($1, $2)", [(i, cents) for i in ids])
        return [str(i) for i in ids]


def create_app(args: argparse.Namespace) -> web.Application:
    app = web.Application(middlewares=make_middlewares(*credentials()))

    async def database(app: web.Application) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(args.database_url, min_size=args.pool_size, max_size=args.pool_size)
        try:
            await pool.execute(SCHEMA)
            ledger.pool = pool
            yield
        finally:
            await pool.close()

    ledger = LeanLedger(None)  # type: ignore[arg-type]  # the pool arrives with the app's startup
    app.cleanup_ctx.append(database)
    add_routes(app, debit=ledger.debit, credit=ledger.credit, seed=ledger.seed)
    return app


def main(argv: list[str] | None = None) -> int:
    return serve_from_command_line(__doc__, create_app, argv)


if __name__ == "__main__":
    sys.exit(main())
