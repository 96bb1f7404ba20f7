"""Every failure becomes a clear JSON answer: ``{"error": {"code": ..., "message": ...}}``.

Domain refusals map by family; malformed input is a 400 naming what was wrong; a
database that cannot be reached is a 503 the client may retry. Anything else is a
bug: it is logged with its traceback and answered 500 without internals.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import msgspec
from aiohttp import web

from hub.wire import encode
from ledger.application.commands import CommandTimedOut
from ledger.domain import errors

log = logging.getLogger(__name__)

_STATUS_BY_FAMILY: tuple[tuple[type[errors.DomainError], int], ...] = (
    (errors.InvalidRequest, 400),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.Refused, 422),
)

_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    # SQLSTATE class 57: the server shut down, crashed, is starting, or an operator ended the
    # session or statement (admin_shutdown, crash_shutdown, cannot_connect_now, query_canceled).
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    # When the server ends a pooled connection (pg_terminate_backend), its FATAL message can arrive
    # before the EOF: the next query, or the pool's reset on release, then fails with "cannot switch
    # to state N; another operation (2) is in progress" (asyncpg issues #784, #1069). The pool drops
    # that connection, so a retry works: it is an outage, not a bug of ours.
    asyncpg.InternalClientError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class ApiError(Exception):
    """A failure that is not the ledger's: a provider that timed out, refused, or answered garbage."""

    def __init__(
        self, status: int, code: str, message: str, *, detail: object = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=encode({"error": {"code": code, "message": message}}),
        content_type="application/json",
        headers=headers,
    )


def status_of(error: errors.DomainError) -> int:
    return next(status for family, status in _STATUS_BY_FAMILY if isinstance(error, family))


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.DomainError as e:
        return error_response(status_of(e), e.code, e.message)
    except ApiError as e:
        response = error_response(e.status, e.code, e.message, headers=e.headers)
        if e.detail is not None:
            response.body = encode({"error": {"code": e.code, "message": e.message, "detail": e.detail}})
        return response
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        return error_response(400, "invalid_request", f"invalid request body: {e}")
    except web.HTTPRequestEntityTooLarge as e:
        return error_response(413, "body_too_large", e.text or "request body too large")
    except web.HTTPMethodNotAllowed as e:
        return error_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}",
            headers={"Allow": ",".join(sorted(e.allowed_methods))},
        )
    except web.HTTPNotFound:
        return error_response(404, "unknown_operation", f"no operation at {request.method} {request.path}")
    except web.HTTPUnsupportedMediaType as e:
        return error_response(415, "unsupported_media_type", e.reason)
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(e.status, "http_error", e.reason)
        raise
    except asyncpg.TransactionRollbackError:
        # A deadlock or serialization failure the ledger did not absorb: transient, and nothing written.
        return error_response(
            503,
            "contended",
            "the ledger was busy with a conflicting write; retry the request",
            headers={"Retry-After": "1"},
        )
    except asyncpg.DataError:
        # A value PostgreSQL cannot hold or compare (a NUL in a path id, a number out of range)
        # came from the request: the request is wrong, whichever handler let it through.
        return error_response(400, "invalid_request", "a value in the request is not valid text or is out of range")
    except CommandTimedOut as e:
        # Its message says what the client needs: the outcome may be unknown, the retry is safe.
        log.warning("no answer from the database in time during %s %s", request.method, request.path)
        return error_response(503, "unavailable", str(e), headers={"Retry-After": "1"})
    except _UNAVAILABLE as e:
        log.warning("database unavailable during %s %s: %r", request.method, request.path, e)
        return error_response(
            503, "unavailable", "the ledger database is unavailable; retry the request", headers={"Retry-After": "1"}
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; it has been logged")
