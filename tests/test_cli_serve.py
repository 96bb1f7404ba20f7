"""`giftcard serve` as a real process: it starts, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from datetime import datetime, timedelta

import aiohttp
import pytest

from hub.cli.serve import PROJECTION_RUNNER_NICENESS
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


async def wait_projected(session: aiohttp.ClientSession, url: str, timeout_s: float = 20.0) -> None:
    """The read model shows the card: the projection runner that serve started is at work."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with session.get(url) as response:
            if response.status == 200:
                return
            assert response.status == 404, await response.text()
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{url} never projected")
        await asyncio.sleep(0.1)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux's /proc), e.g. serve's workers and runner."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            if parent == pid:
                found.append(int(entry))
    return found


def niceness(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19 of proc(5), after "pid (comm)"
    except (OSError, ValueError, IndexError):
        return None


async def wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while alive := [pid for pid in pids if os.path.exists(f"/proc/{pid}")]:
        assert asyncio.get_running_loop().time() < deadline, f"{alive} still running after serve ended"
        await asyncio.sleep(0.2)


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
                card_id = (await response.json())["id"]
            async with session.get(base + "/readyz") as response:
                assert response.status == 200
            await wait_projected(session, f"{base}/api/ledger/balances/{card_id}")
        children = children_of(process.pid)
        assert PROJECTION_RUNNER_NICENESS in map(niceness, children), "the runner yields the CPU to requests"
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert b"Traceback" not in stderr
        await wait_gone(children)
        access = [line for line in map(json.loads, stderr.decode().splitlines()[1:]) if line["message"] == "request"]
        created = [line for line in access if line["method"] == "POST" and line["path"] == "/api/giftcards"]
        assert len(created) == 1, "one access line per request"
        assert created[0]["status"] == 200 and created[0]["route"] == "/api/giftcards"
        assert created[0]["level"] == "INFO" and created[0]["latency_ms"] > 0 and created[0]["request_id"]
        logged_at = datetime.strptime(created[0]["ts"], "%Y-%m-%d %H:%M:%S,%f")  # as logging's asctime
        assert abs(datetime.now() - logged_at) < timedelta(minutes=2)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_projection_runner_does_not_outlive_a_killed_serve(database_url):
    """SIGKILL gives serve no chance to stop its children: the runner notices on its own."""
    env = {**os.environ, "GIFTCARD_DATABASE_URL": database_url, "GIFTCARD_APP_KEY": HUB_KEY}
    env |= {"GIFTCARD_APP_TOKEN": HUB_TOKEN, "GIFTCARD_PROVIDER_APP_KEY": "p", "GIFTCARD_PROVIDER_APP_TOKEN": "p"}
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "serve", "--port", str(port), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_healthy(f"http://127.0.0.1:{port}")
        children = children_of(process.pid)
        assert children, "serve started no process beside itself"
    finally:
        process.kill()
        await process.wait()
    await wait_gone(children)
