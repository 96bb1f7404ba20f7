"""What both baseline servers share: the command line, auth, the wire shapes and the seed route.

The baselines answer the very request our service answers (same route, headers and body) and
check the same credentials, so that the benchmark compares what happens behind the route, not
the cost of skipping work at the edge.
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import msgspec
import uvloop
from aiohttp import web

KEY_HEADER = "X-PROVIDER-API-AppKey"
TOKEN_HEADER = "X-PROVIDER-API-AppToken"
TRANSACTIONS_ROUTE = "/native/giftcards/{card_id}/transactions"
SEED_ROUTE = "/bench/seed"
POOL_SIZE_DEFAULT = 20  # the service's own default (GIFTCARD_POOL_SIZE_MAX), so every server gets as many connections
CENTS = Decimal(100)


class TransactionRequest(msgspec.Struct, rename="camel"):
    """The whole body a checkout sends, parsed as the service parses it (the order's details
    included), though the baselines keep only the amount and the requestId."""

    operation: str
    value: Decimal
    request_id: str
    description: str = ""
    redemption_code: str = ""
    redemption_token: str = ""
    order_info: dict[str, Any] | None = None


class SeedRequest(msgspec.Struct):
    cards: int
    value: Decimal


class Refused(Exception):
    """A rule said no: answered 4xx with the same error shape as the service."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_encoder = msgspec.json.Encoder(decimal_format="number")
_decoders: dict[type, msgspec.json.Decoder] = {}


def decode(body: bytes, type_: type) -> object:
    decoder = _decoders.get(type_) or _decoders.setdefault(type_, msgspec.json.Decoder(type_, float_hook=Decimal))
    try:
        return decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise Refused(400, "invalid_request", f"invalid request body: {e}") from None


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(body), status=status, content_type="application/json")


def to_cents(value: Decimal) -> int:
    """Exact cents or a refusal, as the service does: no amount is ever rounded."""
    cents = value * CENTS
    if not value.is_finite() or value <= 0 or cents != cents.to_integral_value():
        raise Refused(400, "invalid_amount", f"value must be a positive amount in cents, got {value}")
    return int(cents)


def transaction_ref(card_id: str, transaction_id: str) -> dict[str, object]:
    href = f"/native/giftcards/{card_id}/transactions/{transaction_id}"
    return {"cardId": card_id, "id": transaction_id, "_self": {"href": href}}


def credentials() -> tuple[str, str]:
    return os.environ.get("GIFTCARD_PROVIDER_APP_KEY", "bench"), os.environ.get("GIFTCARD_PROVIDER_APP_TOKEN", "bench")


def make_middlewares(key: str, token: str) -> list:
    @web.middleware
    async def auth_and_errors(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith(("/native/", "/bench/")):
            given_key, given_token = request.headers.get(KEY_HEADER), request.headers.get(TOKEN_HEADER)
            if not given_key or not given_token:
                return web.Response(status=401)
            key_ok = hmac.compare_digest(given_key.encode(), key.encode())
            token_ok = hmac.compare_digest(given_token.encode(), token.encode())
            if not (key_ok and token_ok):
                return web.Response(status=403)
        try:
            return await handler(request)
        except Refused as e:
            return json_response({"error": {"code": e.code, "message": e.message}}, e.status)

    return [auth_and_errors]


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


Debit = Callable[[str, int, str, str], Awaitable[str]]
Credit = Callable[[str, int, str], Awaitable[str]]


def add_routes(
    app: web.Application, *, debit: Debit, credit: Credit, seed: Callable[[int, int], Awaitable[list[str]]]
) -> None:
    """The one route under test, plus a seed route so cards are created by the app itself."""

    async def create_transaction(request: web.Request) -> web.Response:
        body = decode(await request.read(), TransactionRequest)
        card_id = request.match_info["card_id"]
        cents = to_cents(body.value)
        if not body.request_id.strip():
            raise Refused(400, "invalid_request", "requestId must be a non-empty string")
        if body.operation == "Debit":
            transaction_id = await debit(card_id, cents, body.request_id, body.description)
        elif body.operation == "Credit":
            transaction_id = await credit(card_id, cents, body.request_id)
        else:
            raise Refused(400, "invalid_request", f"operation must be 'Credit' or 'Debit', got {body.operation!r}")
        return json_response(transaction_ref(card_id, transaction_id))

    async def seed_cards(request: web.Request) -> web.Response:
        body = decode(await request.read(), SeedRequest)
        return json_response({"ids": await seed(body.cards, to_cents(body.value))})

    app.router.add_get("/healthz", healthz)
    app.router.add_post(TRANSACTIONS_ROUTE, create_transaction)
    app.router.add_post(SEED_ROUTE, seed_cards)


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True, help="the database to use (its tables are created if missing)")
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE_DEFAULT, help="database connections (%(default)s)")
    return parser.parse_args(argv)


def run(app: web.Application, args: argparse.Namespace) -> None:
    # No access log: the baselines stand for designs at their leanest (the service logs each request).
    # uvloop, as ``giftcard serve`` runs: every contender on the same event loop.
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=2.0,
        loop=uvloop.new_event_loop(),
    )


def serve_from_command_line(
    docstring: str, create_app: Callable[[argparse.Namespace], web.Application], argv: list[str] | None = None
) -> int:
    """Each baseline's ``main``: the same options (described by the module docstring's first
    paragraph), its app served until the benchmark stops it."""
    args = parse_args(docstring.split("\n\n")[0], argv)
    run(create_app(args), args)
    return 0
