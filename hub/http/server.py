"""The HTTP/1.1 connections under the application: aiohttp's, changed in two ways.

- VTEX's Postman collection sends ``Content-Type`` twice on every POST and PUT
  (``application/json`` and a vnd type), and aiohttp's parsers refuse any repeated
  Content-Type before a handler runs. When every one names a JSON media type, the
  repeats are renamed in the request's head before llhttp reads it.
- A request no parser accepts (a bad request line, a header too long, a control
  character) is answered in the JSON error shape and logged by its kind alone:
  aiohttp's own answer and log line quote the offending bytes, a token among them.

``HubRunner`` is ``web.AppRunner`` with these connections; ``giftcard serve`` and
the tests start the service with it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError, InvalidHeader, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from hub.errors import error_response
from hub.http.native import is_json_media_type, media_type_of
from hub.logs import REFUSED_BY_PARSER

log = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"
_CONTENT_TYPE_FIELD = b"content-type:"
_EXTRA_CONTENT_TYPE_FIELD = b"X-Extra-Type:"  # as long as the field it replaces
_QUOTED_BYTES = re.compile(r":|\bb['\"]")
_DUPLICATE = re.compile(r"Duplicate '([A-Za-z-]+)' header found\.")


def merge_json_content_types(data: bytes) -> bytes:
    """``data``, whose bytes up to the first blank line are (the rest of) a request's head, with
    every Content-Type line after the first renamed ``X-Extra-Type`` when all of them name a JSON
    media type; llhttp then reads one Content-Type, and the application ignores the others.

    Anything else is left as it came, for llhttp to refuse: values that are not all JSON, or a
    Content-Type line cut by the end of ``data``. The new name has the old one's length, so were
    these bytes a body after all, its framing, and that of the requests behind it, would hold.
    """
    head_end = data.find(_HEAD_END)
    head = data if head_end < 0 else data[:head_end]
    if head.lower().count(b"\n" + _CONTENT_TYPE_FIELD) < 2:  # nearly every request: one lower(), no split
        return data
    lines = head.split(b"\r\n")
    complete = len(lines) if head_end >= 0 else len(lines) - 1  # the last line of a cut head may go on
    # Line 0 is the request line, or the tail of a line the previous read began.
    content_types = [
        n for n in range(1, complete) if lines[n][: len(_CONTENT_TYPE_FIELD)].lower() == _CONTENT_TYPE_FIELD
    ]
    if len(content_types) < 2 or not all(_names_json(lines[n]) for n in content_types):
        return data
    for n in content_types[1:]:
        lines[n] = _EXTRA_CONTENT_TYPE_FIELD + lines[n][len(_CONTENT_TYPE_FIELD) :]
    merged = b"\r\n".join(lines) + data[len(head) :]
    assert len(merged) == len(data), "a renamed header keeps every byte where it was"
    return merged


def _names_json(content_type_line: bytes) -> bool:
    value = content_type_line[len(_CONTENT_TYPE_FIELD) :]
    return is_json_media_type(media_type_of(value.decode("latin-1")))


class JsonContentTypesParser:
    """aiohttp's request parser (llhttp, in C), fed heads whose repeated JSON Content-Types are merged.

    Bytes are taken for a head's when they arrive after the body of the last request began has
    ended (or before any): llhttp hands a request over as soon as its head is read, so it holds no
    unfinished body then. A second request pipelined behind a body in one read is not merged.
    """

    def __init__(self, parser: Any) -> None:
        self._parser = parser
        self._last_payload: Any = None

    def feed_data(self, data: bytes) -> tuple[Any, bool, bytes]:
        if self._last_payload is None or self._last_payload.is_eof():
            data = merge_json_content_types(data)
        messages, upgraded, tail = self._parser.feed_data(data)
        if messages:
            self._last_payload = messages[-1][1]
        return messages, upgraded, tail

    def pause_reading(self) -> None:
        self._parser.pause_reading()

    def message_consumed(self) -> None:
        self._parser.message_consumed()

    def set_upgraded(self, upgraded: bool) -> None:
        self._parser.set_upgraded(upgraded)


class HubRequestHandler(RequestHandler):
    """One client connection: aiohttp's, with the parser above and parse errors in JSON."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parser = JsonContentTypesParser(self._parser)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # a handler's failure, not the client's bytes
            return super().handle_error(request, status, exc, message)
        code, reason = describe_parse_error(exc)
        request[REFUSED_BY_PARSER] = code
        log.info("refused a malformed request from %s: %s (%s)", request.remote, code, reason)
        response = error_response(exc.code or 400, code, reason)
        response.force_close()  # the parser cannot tell where the next request would start
        return response


def describe_parse_error(exc: HttpProcessingError) -> tuple[str, str]:
    """An error code and message for what the parser refused, without the bytes it refused:
    aiohttp's messages quote them, and they may be a header's value, a token."""
    duplicate = _DUPLICATE.fullmatch(exc.message)
    if duplicate is not None:
        name = duplicate[1]
        hint = " unless every value is a JSON media type" if name == "Content-Type" else ""
        return "duplicate_header", f"the {name} header may be sent only once{hint}"
    if isinstance(exc, LineTooLong):
        return "line_too_long", f"the request line or a header is longer than {exc.args[1]} bytes"
    if isinstance(exc, (BadStatusLine, InvalidURLError)):
        return "bad_request_line", "the request line is not 'METHOD target HTTP/1.1' in plain ASCII"
    if isinstance(exc, InvalidHeader):
        return "invalid_header", "a header holds a character HTTP does not allow in it"
    return "malformed_request", f"the request is not valid HTTP/1.1: {_quoted_bytes_cut(exc.message)}"


def _quoted_bytes_cut(message: str) -> str:
    """llhttp's reason ("Invalid header value char") without what follows it: the offending line,
    which aiohttp writes after a colon, as a bytes literal."""
    return _QUOTED_BYTES.split(message, maxsplit=1)[0].strip() or "unreadable"


class HubServer(web.Server):
    """aiohttp's server whose connections are ``HubRequestHandler``."""

    def __call__(self) -> HubRequestHandler:
        return HubRequestHandler(self, loop=self._loop, **self._kwargs)


class HubRunner(web.AppRunner):
    """``web.AppRunner`` serving the application through ``HubServer``."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the application's start-up
        return HubServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


async def serve_until_signalled(
    app: web.Application,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    shutdown_timeout_s: float,
    access_log_class: type[AbstractAccessLogger],
    on_serving: Callable[[asyncio.Event], None] | None = None,
) -> None:
    """What ``web.run_app`` does, through ``HubRunner``: serve until SIGINT or SIGTERM, then stop
    accepting and let the requests in flight finish (up to ``shutdown_timeout_s``).

    ``on_serving`` is called once the port accepts, with the event that stops the service."""
    runner = HubRunner(app, shutdown_timeout=shutdown_timeout_s, access_log_class=access_log_class)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
        if on_serving is not None:
            on_serving(stop)
        await stop.wait()
    finally:
        await runner.cleanup()
