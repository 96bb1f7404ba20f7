"""The deliverer's HTTP client (hub/webhooks/client.py), against real receivers on loopback.

What it must keep of aiohttp's client: the egress policy at every connection, statuses as the
receiver sent them (no redirect followed), one deadline; and what it adds: a connection kept
alive between deliveries, never reused once the receiver closed it or asked to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.providers.egress import EgressPolicy
from hub.webhooks import client as client_module
from hub.webhooks.client import ProtocolError, WebhookClient, target_of

LOOPBACK_ALLOWED = EgressPolicy(("127.0.0.0/8",))
HEADERS = {"Content-Type": "application/json", "webhook-id": "7"}
BODY = b'{"id": 7}'


class Receiver:
    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.bodies: list[bytes] = []
        self.user_agents: list[str] = []
        self.answer = "204"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.peers.append(request.transport.get_extra_info("peername"))
        self.bodies.append(await request.read())
        self.user_agents.append(request.headers.get("User-Agent", ""))
        if self.answer == "close":  # answers, and asks for the connection to be closed
            return web.Response(status=200, headers={"Connection": "close"})
        if self.answer == "chunked":
            response = web.StreamResponse(status=202)
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b"x" * 70_000)
            await response.write_eof()
            return response
        if self.answer == "redirect":
            return web.Response(status=307, headers={"Location": "http://127.0.0.1:9/elsewhere"})
        if self.answer == "slow":
            await asyncio.sleep(2)
        return web.Response(status=int(self.answer) if self.answer.isdigit() else 204)


@asynccontextmanager
async def receiving(keepalive_timeout_s: float = 75.0) -> AsyncIterator[tuple[Receiver, str]]:
    """A receiver on loopback, closing a connection idle for ``keepalive_timeout_s`` (aiohttp's default)."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner = web.AppRunner(
        app, keepalive_timeout=keepalive_timeout_s, shutdown_timeout=0.5, handler_cancellation=True, access_log=None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield receiver, f"http://127.0.0.1:{runner.addresses[0][1]}/hooks?tenant=acme"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def client(policy: EgressPolicy = LOOPBACK_ALLOWED) -> AsyncIterator[WebhookClient]:
    webhook_client = WebhookClient(policy, "giftcard-webhooks/test")
    try:
        yield webhook_client
    finally:
        await webhook_client.close()


async def test_deliveries_share_one_kept_alive_connection_and_arrive_whole():
    async with receiving() as (receiver, url), client() as webhooks:
        statuses = [await webhooks.post(url, HEADERS, BODY + bytes([n]), 5.0) for n in range(5)]
    assert statuses == [204] * 5
    assert receiver.bodies == [BODY + bytes([n]) for n in range(5)]
    assert len(set(receiver.peers)) == 1  # one connection for all five
    assert receiver.user_agents == ["giftcard-webhooks/test"] * 5


async def test_a_connection_the_receiver_closes_or_asks_to_close_is_not_reused():
    async with receiving() as (receiver, url), client() as webhooks:
        receiver.answer = "close"
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 200
        receiver.answer = "204"
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 204
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 204
    assert len(set(receiver.peers)) == 2 and receiver.peers[1] == receiver.peers[2]


async def test_an_idle_connection_the_receiver_closed_is_replaced_without_a_failure():
    async with receiving(keepalive_timeout_s=0.05) as (receiver, url), client() as webhooks:
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 204
        await asyncio.sleep(0.3)  # the receiver's keep-alive ends; its close reaches the client
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 204
    assert len(set(receiver.peers)) == 2


async def test_statuses_come_back_as_sent_chunked_answers_are_read_and_redirects_not_followed():
    async with receiving() as (receiver, url), client() as webhooks:
        receiver.answer = "chunked"
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 202
        receiver.answer = "redirect"
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 307
        receiver.answer = "500"
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 500
        receiver.answer = "204"
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 204
    assert len(receiver.bodies) == 4 and len(set(receiver.peers)) == 1  # the chunked body read to its end


async def test_one_deadline_covers_the_answer():
    async with receiving() as (receiver, url), client() as webhooks:
        receiver.answer = "slow"
        with pytest.raises(TimeoutError):
            await webhooks.post(url, HEADERS, BODY, 0.2)
        receiver.answer = "204"
        assert await webhooks.post(url, HEADERS, BODY, 5.0) == 204  # on a new connection


async def test_the_egress_policy_holds_at_every_connection_names_and_literals_alike():
    async with receiving() as (receiver, url), client(EgressPolicy()) as webhooks:
        port = target_of(url).port
        with pytest.raises(OSError, match="internal address"):
            await webhooks.post(url, HEADERS, BODY, 5.0)
        with pytest.raises(OSError, match="resolves only to internal addresses"):
            await webhooks.post(f"http://localhost:{port}/hooks", HEADERS, BODY, 5.0)
    assert receiver.bodies == []


async def test_an_answer_that_is_not_http_is_a_failure_not_a_status():
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client() as webhooks:
            with pytest.raises(ProtocolError, match="not an HTTP answer"):
                await webhooks.post(f"http://127.0.0.1:{port}/x", HEADERS, BODY, 5.0)
            with pytest.raises(ConnectionRefusedError):
                await webhooks.post("http://127.0.0.1:9/x", HEADERS, BODY, 5.0)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nthanks",  # the body ends with the connection
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut short",  # the status was said before the cut
    ],
    ids=["http-1.0-body-until-close", "interim-answer-first", "body-cut-short"],
)
async def test_raw_answers_give_their_final_status(answer):
    async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(BODY)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answering, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client() as webhooks:
            assert await webhooks.post(f"http://127.0.0.1:{port}/x", HEADERS, BODY, 5.0) == 200
    finally:
        server.close()
        await server.wait_closed()


async def test_idle_connections_are_bounded_the_longest_idle_closed_first(monkeypatch):
    monkeypatch.setattr(client_module, "IDLE_MAX", 2)
    async with (
        receiving() as (first, first_url),
        receiving() as (second, second_url),
        receiving() as (third, third_url),
        client() as webhooks,
    ):
        for url in (first_url, second_url, third_url):
            assert await webhooks.post(url, HEADERS, BODY, 5.0) == 204
        assert webhooks.idle_connections == 2  # the first receiver's was closed for the third's
        for url in (second_url, third_url, first_url):
            assert await webhooks.post(url, HEADERS, BODY, 5.0) == 204
    assert len(set(first.peers)) == 2  # a new connection after its first was closed
    assert len(set(second.peers)) == 1 and len(set(third.peers)) == 1


async def test_https_receivers_must_prove_their_name_with_a_trusted_certificate(tmp_path):
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_self_signed_tls(tmp_path)).start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}/hooks"
        async with client() as webhooks:
            with pytest.raises(ssl.SSLCertVerificationError):
                await webhooks.post(url, HEADERS, BODY, 5.0)
    finally:
        await runner.cleanup()
    assert receiver.bodies == []


def _self_signed_tls(folder: Path) -> ssl.SSLContext:
    """A server context whose certificate names 127.0.0.1 but that no authority signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


def test_a_url_becomes_one_request_line_and_host_and_bad_ones_are_refused():
    assert target_of("https://hooks.example.com/in?a=1").request_line_and_host == (
        b"POST /in?a=1 HTTP/1.1\r\nHost: hooks.example.com\r\n"
    )
    assert target_of("http://[::1]:8080").request_line_and_host == b"POST / HTTP/1.1\r\nHost: [::1]:8080\r\n"
    assert target_of("https://hooks.example.com/in").port == 443
    for url in ("ftp://example.com/x", "http:///x", "http://example.com/a b", "http://example.com/a\r\nX: y"):
        with pytest.raises(ValueError, match="webhook url"):
            target_of(url)


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent():
    async with receiving() as (receiver, url), client() as webhooks:
        with pytest.raises(ValueError, match="line break"):
            await webhooks.post(url, {"webhook-id": "7\r\nX-Injected: 1"}, BODY, 5.0)
    assert receiver.bodies == []
