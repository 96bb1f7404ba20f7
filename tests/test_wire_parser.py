"""What reaches ``giftcard serve`` before any handler runs: raw bytes on a loopback socket.

VTEX's Postman collection sends two Content-Type headers (``application/json`` and a vnd type) on
every POST and PUT; probes send request lines and headers no parser accepts. Each gets an answer in
the project's JSON error shape, and the log keeps no header bytes of what was refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from hub.http.server import merge_json_content_types
from tests.hub_process import HOST, HUB_KEY, HUB_TOKEN, PROVIDER_KEY, PROVIDER_TOKEN, HubProcess

ANSWER_TIMEOUT_S = 10.0
HEADER_BYTES_OVER_LIMIT = 9000  # aiohttp refuses a header line over 8190 bytes
BASIC_CREDENTIALS = base64.b64encode(f"{HUB_KEY}:{HUB_TOKEN}".encode()).decode()


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        error = json.loads(self.body)["error"]
        assert set(error) >= {"code", "message"} and error["message"], error
        return error


class RawConnection:
    """One keep-alive connection that writes exactly the bytes it is given, as Postman's or a probe's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, raw: bytes) -> RawAnswer:
        self.writer.write(raw)
        await self.writer.drain()
        return await asyncio.wait_for(self._answer(), ANSWER_TIMEOUT_S)

    async def _answer(self) -> RawAnswer:
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.rstrip("\r\n").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        length = headers.get("content-length")
        body = await (self.reader.readexactly(int(length)) if length is not None else self.reader.read())
        return RawAnswer(int(status_line.split()[1]), headers, body)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def hub(database_url: str, tmp_path) -> AsyncIterator[HubProcess]:
    process = HubProcess(database_url, tmp_path / "hub.log")
    await process.start()
    yield process
    await process.stop()


@pytest.fixture
async def connect(hub: HubProcess) -> AsyncIterator:
    opened: list[RawConnection] = []

    async def open_one() -> RawConnection:
        connection = RawConnection(*await asyncio.open_connection(HOST, hub.port))
        opened.append(connection)
        return connection

    yield open_one
    for connection in opened:
        await connection.close()


def raw_request(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", *(f"{name}: {value}" for name, value in headers)]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def postman_post(path: str, auth: list[tuple[str, str]], vnd: str, body: dict) -> bytes:
    """As VTEX's collection sends it: both media types, in two Content-Type headers."""
    content_types = [("Content-Type", "application/json"), ("Content-Type", vnd)]
    return raw_request("POST", path, [("Accept", "application/json"), *content_types, *auth], json.dumps(body).encode())


PROVIDER_AUTH = [("X-PROVIDER-API-AppKey", PROVIDER_KEY), ("X-PROVIDER-API-AppToken", PROVIDER_TOKEN)]
HUB_AUTH = [("X-VTEX-API-AppKey", HUB_KEY), ("X-VTEX-API-AppToken", HUB_TOKEN)]


def new_card(relation_name: str) -> dict:
    return {"relationName": relation_name, "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"}


async def test_postman_requests_with_two_json_content_types_are_served(connect, pool):
    connection = await connect()  # one keep-alive connection, as newman uses
    native = await connection.exchange(
        postman_post("/native/giftcards", PROVIDER_AUTH, "application/vnd.vtex.giftcards.v1+json", new_card("native"))
    )
    assert native.status == 200, native
    card_id = json.loads(native.body)["id"]
    credit = {"operation": "Credit", "value": 25, "description": "postman", "requestId": "postman-credit"}
    transaction = await connection.exchange(
        postman_post(f"/native/giftcards/{card_id}/transactions", PROVIDER_AUTH, "application/json", credit)
    )
    assert transaction.status == 200, transaction
    api = await connection.exchange(
        postman_post("/api/giftcards", HUB_AUTH, "application/vnd.vtex.giftcard.v1+json", new_card("api"))
    )
    assert api.status == 200, api
    hub_route = await connection.exchange(
        postman_post(
            "/api/giftcardproviders/VtexGiftCard/giftcards",
            HUB_AUTH,
            "application/vnd.vtex.giftcardproviders.v1+json",
            new_card("hub"),
        )
    )
    assert hub_route.status == 200, hub_route
    cards = await pool.fetchval("select count(distinct stream_id) from events where type like '%.Issued'")
    assert cards == 3


async def test_two_content_types_not_both_json_are_refused_in_json_and_write_nothing(connect, pool):
    connection = await connect()
    raw = raw_request(
        "POST",
        "/native/giftcards",
        [("Content-Type", "application/json"), ("Content-Type", "text/plain"), *PROVIDER_AUTH],
        json.dumps(new_card("refused")).encode(),
    )
    answer = await connection.exchange(raw)
    assert answer.status == 400
    assert "Content-Type" in answer.error()["message"]
    assert await pool.fetchval("select count(*) from events") == 0


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GET /healthz HTTP/1.1 trailing\r\nHost: x\r\n\r\n", id="bad request line"),
        pytest.param(b"FETCH\x01 / HTTP/1.1\r\nHost: x\r\n\r\n", id="bad method"),
        pytest.param(raw_request("GET", "/healthz", [("X-Pad", "a" * HEADER_BYTES_OVER_LIMIT)]), id="header too large"),
        pytest.param(raw_request("GET", "/" + "a" * HEADER_BYTES_OVER_LIMIT, []), id="request line too large"),
        pytest.param(raw_request("GET", "/healthz", [("X-Bad", "a\x01b")]), id="control character"),
        pytest.param(raw_request("GET", "/healthz", [("Host", "again")]), id="duplicate Host"),
    ],
)
async def test_parser_refusals_answer_in_the_json_error_shape(connect, raw):
    answer = await (await connect()).exchange(raw)
    assert 400 <= answer.status < 500
    answer.error()


async def test_malformed_requests_log_no_credentials_and_an_access_line_each(hub, connect):
    oversize_token = raw_request(
        "GET", "/native/giftcards/x", [("X-PROVIDER-API-AppToken", PROVIDER_TOKEN + "a" * HEADER_BYTES_OVER_LIMIT)]
    )
    basic_with_control = raw_request("GET", "/api/giftcards/x", [("Authorization", f"Basic {BASIC_CREDENTIALS}\x01")])
    basic_with_nul = raw_request("GET", "/api/giftcards/x", [("Authorization", f"Basic {BASIC_CREDENTIALS}\x00")])
    for raw in (oversize_token, basic_with_control, basic_with_nul):
        answer = await (await connect()).exchange(raw)
        assert answer.status in (400, 431), answer
        assert PROVIDER_TOKEN.encode() not in answer.body and BASIC_CREDENTIALS.encode() not in answer.body
    await hub.stop()  # its log is complete

    log = hub.log_text()
    assert PROVIDER_TOKEN not in log and BASIC_CREDENTIALS not in log
    assert "Traceback" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refused = [line for line in lines if line["message"] == "request" and line["status"] in (400, 431)]
    assert len(refused) == 3, "one access line per refused request"


HEAD = b"POST /native/giftcards HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("data", "merged"),
    [
        pytest.param(
            HEAD + b"content-type: application/vnd.vtex.giftcards.v1+json; charset=utf-8\r\n\r\n{}",
            HEAD + b"X-Extra-Type: application/vnd.vtex.giftcards.v1+json; charset=utf-8\r\n\r\n{}",
            id="both JSON: the second renamed, the body as it came",
        ),
        pytest.param(HEAD + b"Content-Type: text/plain\r\n\r\n{}", None, id="not all JSON: left for the parser"),
        pytest.param(HEAD + b"Content-Type: application/js", None, id="the second cut by the end of the read"),
        pytest.param(
            HEAD + b"\r\n" + b"\r\nContent-Type: application/json" * 2, None, id="JSON-looking lines in the body"
        ),
    ],
)
def test_only_a_heads_repeated_json_content_types_are_merged(data: bytes, merged: bytes | None):
    assert merge_json_content_types(data) == (data if merged is None else merged)
