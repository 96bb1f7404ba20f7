"""`giftcard serve` as a real process: it starts, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import aiohttp
import pytest

from tests.conftest import HUB_KEY, HUB_TOKEN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(url: str, timeout_s: float = 20.0) -> None:
    async with aiohttp.ClientSession() as session:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                async with session.get(url + "/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("service did not become healthy")
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_runs_and_stops_cleanly_on_sigterm(database_url, workers):
    port = free_port()
    env = {
        **os.environ,
        "GIFTCARD_DATABASE_URL": database_url,
        "GIFTCARD_APP_KEY": HUB_KEY,
        "GIFTCARD_APP_TOKEN": HUB_TOKEN,
        "GIFTCARD_PROVIDER_APP_KEY": "p",
        "GIFTCARD_PROVIDER_APP_TOKEN": "p",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base)
        headers = {"X-VTEX-API-AppKey": HUB_KEY, "X-VTEX-API-AppToken": HUB_TOKEN}
        async with aiohttp.ClientSession(headers=headers) as session:
            body = {"relationName": "r", "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"}
            async with session.post(base + "/api/giftcards", json=body) as response:
                assert response.status == 200
            async with session.get(base + "/readyz") as response:
                assert response.status == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert b"Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
