"""``giftcard serve`` as a real OS process on 127.0.0.1, and a small /native client for it.

Used by the fault tests (tests/test_faults.py) and the reliability bench (bench/reliability.py):
they kill, restart and load these processes, so everything here is bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # every request of these tests stays on this machine

HUB_KEY, HUB_TOKEN = "fault-hub-key", "fault-hub-token"
PROVIDER_KEY, PROVIDER_TOKEN = "fault-provider-key", "fault-provider-token"
PROVIDER_HEADERS = {"X-PROVIDER-API-AppKey": PROVIDER_KEY, "X-PROVIDER-API-AppToken": PROVIDER_TOKEN}

HEALTHY_TIMEOUT_S = 30.0
HEALTH_POLL_S = 0.05
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def service_env(database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "GIFTCARD_DATABASE_URL": database_url,
        "GIFTCARD_APP_KEY": HUB_KEY,
        "GIFTCARD_APP_TOKEN": HUB_TOKEN,
        "GIFTCARD_PROVIDER_APP_KEY": PROVIDER_KEY,
        "GIFTCARD_PROVIDER_APP_TOKEN": PROVIDER_TOKEN,
    }


class HubProcess:
    """One ``python -m hub.cli serve`` process; ``start`` again after ``kill`` reuses the same port.

    Its stderr (log lines, access log) goes to a file, never to a pipe: a pipe nobody reads fills
    up under load and would block the server, which is exactly the kind of hang these tests hunt.
    """

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        *,
        port: int | None = None,
        workers: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.database_url = database_url
        self.env = env or {}
        self.log_path = log_path
        self.port = port or free_port()
        self.workers = workers
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    async def start(self) -> None:
        assert self.process is None or self.process.returncode is not None, "already running"
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hub.cli",
                "serve",
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                cwd=ROOT,
                env={**service_env(self.database_url), **self.env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        self.starts += 1
        await self.wait_healthy()

    async def wait_healthy(self, timeout_s: float = HEALTHY_TIMEOUT_S) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while loop.time() < deadline:
                if self.process is not None and self.process.returncode is not None:
                    raise RuntimeError(f"hub exited with {self.process.returncode}; see {self.log_path}")
                try:
                    async with session.get(self.base_url + "/healthz") as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(HEALTH_POLL_S)
        raise TimeoutError(f"hub on port {self.port} not healthy within {timeout_s} s; see {self.log_path}")

    async def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, in-flight requests are cut mid-way."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)

    async def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Safe to call when already gone."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


class NativeClient:
    """The few /native Provider Protocol calls the fault scenarios need."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, headers: dict[str, str] | None = None) -> None:
        self.session = session
        self.base_url = base_url
        self.headers = headers or PROVIDER_HEADERS  # the env pair's (the default tenant's), unless a store's

    async def call(self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None) -> Answer:
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        async with self.session.request(
            method,
            self.base_url + "/native" + path,
            json=body,
            headers=self.headers,
            timeout=timeout,
        ) as response:
            body = await response.json(content_type=None) if await response.read() else None
            return Answer(response.status, body, dict(response.headers))

    async def create_card(self, relation_name: str) -> str:
        answer = await self.call(
            "POST", "/giftcards", {"relationName": relation_name, "caption": "fault", "profileId": "p"}
        )
        assert answer.status == 200, answer
        return answer.body["id"]

    async def credit(self, card_id: str, value: Decimal, request_id: str) -> None:
        answer = await self.transaction(card_id, "Credit", value, request_id)
        assert answer.status == 200, answer

    async def transaction(
        self, card_id: str, operation: str, value: Decimal, request_id: str, *, timeout_s: float | None = None
    ) -> Answer:
        body = {"operation": operation, "value": float(value), "description": "fault test", "requestId": request_id}
        return await self.call("POST", f"/giftcards/{card_id}/transactions", body, timeout_s=timeout_s)

    async def balance(self, card_id: str) -> Decimal:
        answer = await self.call("GET", f"/giftcards/{card_id}")
        assert answer.status == 200, answer
        return Decimal(str(answer.body["balance"]))


class TimedClient(NativeClient):
    """Remembers when each request that got a 200 was sent and answered: the time from a fault to
    the first success (failover tests and bench/failover.py)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        super().__init__(session, base_url)
        self.successes: list[tuple[float, float]] = []  # (sent, answered), monotonic

    async def transaction(self, *args, **kwargs) -> Answer:
        sent = time.monotonic()
        answer = await super().transaction(*args, **kwargs)
        if answer.status == 200:
            self.successes.append((sent, time.monotonic()))
        return answer

    def first_success_sent_after(self, moment: float) -> float | None:
        """When the first request sent after ``moment`` was answered 200: one sent after the old
        primary was dead can only have been served by the new one."""
        return min((answered for sent, answered in self.successes if sent > moment), default=None)
