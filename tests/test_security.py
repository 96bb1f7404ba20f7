"""Who may do what: keys with roles, created and revoked by operators, stored only as hashes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from hub import auth

ROOT = Path(__file__).resolve().parents[1]
CARD = "/api/giftcards/00000000-0000-0000-0000-000000000000"


async def status_with(service, key: str, token: str, method: str = "GET", path: str = CARD, body=None) -> int:
    headers = {"X-VTEX-API-AppKey": key, "X-VTEX-API-AppToken": token}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, service.base_url + path, json=body, headers=headers) as response:
            return response.status


async def eventually(check, timeout_s: float = 2 * auth.KEY_REFRESH_S + 1) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "not true within the refresh interval"
        await asyncio.sleep(0.1)


def run_cli(database_url: str, *args: str) -> str:
    env = {**os.environ, "GIFTCARD_DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-m", "hub.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_view_keys_read_but_cannot_change_anything(service, pool):
    key, token = await auth.create_key(pool, auth.HUB, (auth.VIEW,))
    await eventually(lambda: _is(status_with(service, key, token), 404))
    create = {"relationName": "r", "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"}
    async with aiohttp.ClientSession() as session:
        headers = {"X-VTEX-API-AppKey": key, "X-VTEX-API-AppToken": token}
        async with session.post(service.base_url + "/api/giftcards", json=create, headers=headers) as response:
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "forbidden"
        async with session.post(service.base_url + "/api/giftcards/_search", json={}, headers=headers) as response:
            assert response.status == 200, "a search is a read"
    assert await pool.fetchval("select count(*) from events") == 0


async def test_edit_keys_change_and_revoked_keys_stop_working(service, pool):
    key, token = await auth.create_key(pool, auth.HUB, (auth.VIEW, auth.EDIT))
    create = {"relationName": "r", "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"}
    await eventually(lambda: _is(status_with(service, key, token, "POST", "/api/giftcards", create), 200))
    assert await auth.revoke_key(pool, key)
    await eventually(lambda: _is(status_with(service, key, token), 403))


async def test_hub_keys_do_not_open_the_provider_protocol(service, pool):
    key, token = await auth.create_key(pool, auth.HUB, (auth.VIEW, auth.EDIT))
    async with aiohttp.ClientSession() as session:
        headers = {"X-PROVIDER-API-AppKey": key, "X-PROVIDER-API-AppToken": token}
        await asyncio.sleep(auth.KEY_REFRESH_S + 0.5)
        async with session.get(service.base_url + "/native/giftcards/x", headers=headers) as response:
            assert response.status == 403 and await response.read() == b""


async def test_tokens_are_stored_only_as_hashes(pool):
    key, token = await auth.create_key(pool, auth.HUB, (auth.VIEW,))
    rows = await pool.fetch("select * from api_keys")
    assert token not in str([dict(r) for r in rows])
    assert token.encode() not in b"".join(bytes(r["token_hash"]) for r in rows)


async def test_keys_cli_creates_lists_and_revokes(service, database_url):
    out = await asyncio.to_thread(run_cli, database_url, "keys", "create", "--role", "view")
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    key, token = lines["X-VTEX-API-AppKey"], lines["X-VTEX-API-AppToken"]
    await eventually(lambda: _is(status_with(service, key, token), 404))
    listing = await asyncio.to_thread(run_cli, database_url, "keys", "list")
    assert key in listing and token not in listing
    await asyncio.to_thread(run_cli, database_url, "keys", "revoke", key)
    await eventually(lambda: _is(status_with(service, key, token), 403))


def test_every_cli_subcommand_has_help():
    for args in (["--help"], ["keys", "--help"], ["keys", "create", "--help"], ["db", "--help"], ["serve", "--help"]):
        done = subprocess.run([sys.executable, "-m", "hub.cli", *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0 and "usage:" in done.stdout, args


async def _is(awaitable, expected: int) -> bool:
    return await awaitable == expected
