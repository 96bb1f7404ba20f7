"""An external provider, spoken to over the Gift Card Provider Protocol.

Every call has a deadline (1.5 s for get card, which sits on checkout's "add
payment" path; 15 s otherwise) that covers its retries too, so the caller always
gets an answer within budget. Only idempotent calls are retried (GETs, and POSTs
that carry a ``requestId``). A provider that times out, refuses the connection or
answers garbage becomes a clear 502/503/504 naming it; its circuit breaker keeps
one dead provider from slowing every checkout. Every call is recorded as an event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from hub.config import Settings
from hub.errors import ApiError
from hub.metrics import Metrics
from hub.providers.breaker import CircuitBreaker
from hub.providers.egress import EgressPolicy, refuses_literal
from hub.wire import check_depth, encode
from ledger.application.providers import RegisteredProvider
from ledger.domain.errors import InvalidRequest
from ledger.eventstore.codec import canonical_json
from ledger.eventstore.store import EventStore, NewEvent

log = logging.getLogger(__name__)

VND_JSON = "application/vnd.vtex.giftcards.v1+json"
RESPONSE_BYTES_MAX = 1024 * 1024
RETRY_BACKOFF_S = 0.05
FORWARDED = "ProviderCallForwarded"

_decoder = msgspec.json.Decoder(float_hook=Decimal)


# The least each answer must hold for the hub to use it; anything else passes through.
class _SearchItem(msgspec.Struct):
    id: str
    balance: Decimal


class _Card(msgspec.Struct):
    id: str
    balance: Decimal


class _Created(msgspec.Struct):
    id: str


class _TransactionRef(msgspec.Struct):
    id: str


class _OperationRecord(msgspec.Struct):
    oid: str
    value: Decimal
    date: str


_SHAPES: dict[str, Any] = {
    "ListAllGiftCards": list[_SearchItem],
    "GetGiftCardbyID": _Card,
    "CreateGiftCard": _Created,
    "ListAllGiftCardTransactions": list[_TransactionRef],
    "CreateGiftCardTransaction": _TransactionRef,
    "GetGiftCardTransactionbyID": dict[str, Any],
    "GetGiftCardTransactionAuthorization": _OperationRecord,
    "ListAllGiftCardTransactionsSettlements": list[_OperationRecord],
    "CreateGiftCardTransactionSettlement": _OperationRecord,
    "ListAllGiftCardTransactionsCancellations": list[_OperationRecord],
    "CreateGiftCardTransactionCancellation": _OperationRecord,
}


@dataclass(frozen=True)
class Call:
    operation: str
    method: str
    path: str
    body: bytes | None = None
    idempotent: bool = True
    card_id: str | None = None
    transaction_id: str | None = None
    value: Decimal | None = None
    request_id: str | None = None
    rest_range: str | None = None
    direction: str | None = None  # Credit or Debit, for a created transaction


@dataclass(frozen=True)
class Outbound:
    """What every call to an external provider goes through, whichever provider it is: the HTTP
    session, the egress policy that guards it, the settings that bound it, and the metrics and
    event store that record it."""

    session: aiohttp.ClientSession
    egress: EgressPolicy
    settings: Settings
    metrics: Metrics
    store: EventStore


class ExternalProvider:
    def __init__(self, registered: RegisteredProvider, breaker: CircuitBreaker, outbound: Outbound) -> None:
        self.registered = registered
        self.id = registered.spec.id
        self.breaker = breaker
        self.outbound = outbound

    # ---- the 11 operations ---------------------------------------------------------

    async def search(self, body: bytes, rest_range: str | None) -> tuple[list[dict[str, Any]], dict[str, str]]:
        answer, headers = await self.call(
            Call("ListAllGiftCards", "POST", "/giftcards/_search", body, rest_range=rest_range)
        )
        passed = {k: headers[k] for k in ("REST-Content-Range",) if k in headers}
        return answer, passed

    async def create_card(self, body: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
        # Creating a card carries no requestId: a retry could issue two cards.
        answer, _ = await self.call(Call("CreateGiftCard", "POST", "/giftcards", body, idempotent=False), metadata)
        return answer

    async def get_card(self, card_id: str) -> dict[str, Any]:
        answer, _ = await self.call(Call("GetGiftCardbyID", "GET", f"/giftcards/{_segment(card_id)}", card_id=card_id))
        return answer

    async def list_transactions(self, card_id: str) -> list[dict[str, Any]]:
        path = f"/giftcards/{_segment(card_id)}/transactions"
        answer, _ = await self.call(Call("ListAllGiftCardTransactions", "GET", path, card_id=card_id))
        return answer

    async def create_transaction(self, card_id: str, body: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
        fields = _operation_fields(body)
        path = f"/giftcards/{_segment(card_id)}/transactions"
        call = Call(
            "CreateGiftCardTransaction",
            "POST",
            path,
            body,
            card_id=card_id,
            value=fields.get("value"),
            request_id=fields.get("requestId"),
            idempotent=bool(fields.get("requestId")),
            direction=fields.get("operation") if fields.get("operation") in ("Credit", "Debit") else None,
        )
        answer, _ = await self.call(call, metadata)
        return answer

    async def get_transaction(self, card_id: str, transaction_id: str) -> dict[str, Any]:
        call = Call(
            "GetGiftCardTransactionbyID",
            "GET",
            _transaction_path(card_id, transaction_id),
            card_id=card_id,
            transaction_id=transaction_id,
        )
        answer, _ = await self.call(call)
        return answer

    async def get_authorization(self, card_id: str, transaction_id: str) -> dict[str, Any]:
        return await self._get_sub("GetGiftCardTransactionAuthorization", card_id, transaction_id, "authorization")

    async def list_settlements(self, card_id: str, transaction_id: str) -> list[dict[str, Any]]:
        return await self._get_sub("ListAllGiftCardTransactionsSettlements", card_id, transaction_id, "settlements")

    async def list_cancellations(self, card_id: str, transaction_id: str) -> list[dict[str, Any]]:
        return await self._get_sub("ListAllGiftCardTransactionsCancellations", card_id, transaction_id, "cancellations")

    async def settle(self, card_id: str, transaction_id: str, body: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
        return await self._post_sub(
            "CreateGiftCardTransactionSettlement", card_id, transaction_id, "settlements", body, metadata
        )

    async def cancel(self, card_id: str, transaction_id: str, body: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
        return await self._post_sub(
            "CreateGiftCardTransactionCancellation", card_id, transaction_id, "cancellations", body, metadata
        )

    async def _get_sub(self, operation: str, card_id: str, transaction_id: str, leaf: str) -> Any:
        path = f"{_transaction_path(card_id, transaction_id)}/{leaf}"
        answer, _ = await self.call(Call(operation, "GET", path, card_id=card_id, transaction_id=transaction_id))
        return answer

    async def _post_sub(
        self, operation: str, card_id: str, transaction_id: str, leaf: str, body: bytes, metadata: dict[str, Any]
    ) -> Any:
        fields = _operation_fields(body)
        call = Call(
            operation,
            "POST",
            f"{_transaction_path(card_id, transaction_id)}/{leaf}",
            body,
            card_id=card_id,
            transaction_id=transaction_id,
            value=fields.get("value"),
            request_id=fields.get("requestId"),
            idempotent=bool(fields.get("requestId")),
        )
        answer, _ = await self.call(call, metadata)
        return answer

    # ---- the control flow of every call ---------------------------------------------

    async def call(self, call: Call, metadata: dict[str, Any] | None = None) -> tuple[Any, dict[str, str]]:
        timeout_s = (
            self.outbound.settings.provider_get_card_timeout_s
            if call.operation == "GetGiftCardbyID"
            else self.outbound.settings.provider_timeout_s
        )
        correlation = (metadata or {}).get("requestId") or uuid.uuid4().hex
        started = time.monotonic()
        deadline = started + timeout_s
        attempt = 0
        while True:
            if not self.breaker.allow():
                failure = ApiError(
                    503,
                    "provider_unavailable",
                    f"gift card provider {self.id} is failing; calls to it are suspended for a few seconds",
                    headers={"Retry-After": str(max(1, round(self.breaker.retry_after_s())))},
                )
                await self._record(call, "circuit_open", None, started)
                raise failure
            try:
                status, raw, headers = await self._send(call, correlation, deadline - time.monotonic())
            except TimeoutError:
                failure = ApiError(
                    504, "provider_timeout", f"gift card provider {self.id} did not answer within {timeout_s:g} s"
                )
                outcome, status = "timeout", None
            except (aiohttp.ClientError, OSError) as e:
                failure = ApiError(
                    502,
                    "provider_unreachable",
                    f"gift card provider {self.id} could not be reached ({type(e).__name__})",
                )
                outcome, status = "unreachable", None
            else:
                outcome, answer_or_failure = self._judge(call, status, raw)
                if not isinstance(answer_or_failure, ApiError):
                    self.breaker.record_success()
                    await self._record(call, outcome, status, started, answer_or_failure)
                    return answer_or_failure, headers
                failure = answer_or_failure
                if outcome == "refused":  # the provider is healthy; it said no
                    self.breaker.record_success()
                    await self._record(call, outcome, status, started)
                    raise failure
            self.breaker.record_failure()
            attempt += 1
            backoff_s = RETRY_BACKOFF_S * 2**attempt * random.uniform(0.5, 1.0)
            retryable = call.idempotent and attempt <= self.outbound.settings.provider_retries_max
            if not retryable or time.monotonic() + backoff_s >= deadline:
                await self._record(call, outcome, status, started)
                raise failure
            await asyncio.sleep(backoff_s)

    async def _send(self, call: Call, correlation: str, remaining_s: float) -> tuple[int, bytes, dict[str, str]]:
        if remaining_s <= 0:
            raise TimeoutError
        credentials = self.registered.credentials
        headers = {
            "Accept": VND_JSON,
            "X-Request-Id": correlation,
            "x-vtex-operation-id": correlation,
        }
        if credentials is not None:
            headers["X-PROVIDER-API-AppKey"] = credentials.app_key
            headers["X-PROVIDER-API-AppToken"] = credentials.app_token
        if call.body is not None:
            headers["Content-Type"] = VND_JSON
        if call.rest_range:
            headers["REST-Range"] = call.rest_range
        url = self.registered.spec.service_url + call.path
        if refuses_literal(self.outbound.egress, url):
            raise OSError("the provider's address is internal and not in GIFTCARD_PROVIDER_ALLOWLIST")
        async with asyncio.timeout(remaining_s):
            async with self.outbound.session.request(
                call.method, url, data=call.body, headers=headers, allow_redirects=False
            ) as response:
                raw = await response.content.read(RESPONSE_BYTES_MAX + 1)
                return response.status, raw, dict(response.headers)

    def _judge(self, call: Call, status: int, raw: bytes) -> tuple[str, Any]:
        """Turns a provider's answer into the decoded body, or the ApiError the caller gets."""
        if status >= 500:
            return "error", ApiError(502, "provider_error", f"gift card provider {self.id} answered HTTP {status}")
        if status in (401, 403):
            return "error", ApiError(
                502, "provider_rejected_credentials", f"gift card provider {self.id} refused the hub's credentials"
            )
        if len(raw) > RESPONSE_BYTES_MAX:
            return "bad_response", ApiError(
                502, "provider_bad_response", f"gift card provider {self.id} answered too much"
            )
        try:
            check_depth(raw)
        except InvalidRequest as e:
            return "bad_response", ApiError(
                502, "provider_bad_response", f"gift card provider {self.id} answered {e.message} (HTTP {status})"
            )
        try:
            body = _decoder.decode(raw) if raw.strip() else None
        except msgspec.DecodeError:
            return "bad_response", ApiError(
                502, "provider_bad_response", f"gift card provider {self.id} answered malformed JSON (HTTP {status})"
            )
        if status >= 400:
            return "refused", ApiError(
                status,
                "provider_refused",
                f"gift card provider {self.id} refused the request (HTTP {status})",
                detail=body,
            )
        try:
            msgspec.convert(body, _SHAPES[call.operation])
        except msgspec.ValidationError as e:
            return "bad_response", ApiError(
                502, "provider_bad_response", f"gift card provider {self.id} answered an unexpected shape: {e}"
            )
        return "ok", body

    async def _record(self, call: Call, outcome: str, status: int | None, started: float, answer: Any = None) -> None:
        """Audit and finance see external providers' activity as events too."""
        transaction_id = call.transaction_id
        if transaction_id is None and call.operation == "CreateGiftCardTransaction" and isinstance(answer, dict):
            transaction_id = str(answer.get("id"))  # the provider's id: its settlements join on it
        elapsed_s = time.monotonic() - started
        self.outbound.metrics.observe_provider_call(
            self.id, call.operation, outcome, elapsed_s, self.breaker.state.value
        )
        data = {
            "operation": call.operation,
            "providerId": self.id,
            "cardId": call.card_id,
            "transactionId": transaction_id,
            "transactionOperation": call.direction,
            "value": None if call.value is None else str(call.value),
            "requestId": call.request_id,
            "outcome": outcome,
            "httpStatus": status,
            "latencyMs": round(elapsed_s * 1000, 1),
        }
        try:
            await self.outbound.store.append(
                f"forwarded-{uuid.uuid4()}", 0, [NewEvent(FORWARDED, canonical_json(encode(data)))]
            )
        except Exception:  # the provider already answered; losing the record must not lose the answer
            log.warning("could not record a call forwarded to provider %s", self.id, exc_info=True)


def _operation_fields(body: bytes) -> dict[str, Any]:
    try:
        decoded = _decoder.decode(body)
    except msgspec.DecodeError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _segment(value: str) -> str:
    """Ids go into the provider's URL as one path segment, never as a path of their own."""
    return quote(value, safe="")


def _transaction_path(card_id: str, transaction_id: str) -> str:
    return f"/giftcards/{_segment(card_id)}/transactions/{_segment(transaction_id)}"
