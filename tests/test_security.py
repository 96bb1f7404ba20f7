"""Who may do what: keys with roles, created and revoked by operators, stored only as hashes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from hub.http import auth

ROOT = Path(__file__).resolve().parents[1]
CARD = "/api/giftcards/00000000-0000-0000-0000-000000000000"


async def status_with(service, key: str, token: str, method: str = "GET", path: str = CARD, body=None) -> int:
    headers = {"X-VTEX-API-AppKey": key, "X-VTEX-API-AppToken": token}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, service.base_url + path, json=body, headers=headers) as response,
    ):
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


# ---- redemption-code brute force -------------------------------------------------------------


async def funded_voucher(service) -> dict:
    status, card, _ = await service.call(
        "POST", "/native/giftcards", {"relationName": f"v-{time.monotonic()}", "caption": "c", "profileId": "owner"}
    )
    await service.call(
        "POST", f"/native/giftcards/{card['id']}/transactions", {"operation": "Credit", "value": 5, "requestId": "l"}
    )
    return card


async def search_code(service, code: str, client_id: str, path: str = "/native/giftcards/_search", **client):
    return await service.call("POST", path, {"client": {"id": client_id, **client}, "cart": {"redemptionCode": code}})


def wrong_code(i: int) -> str:
    return f"AAAA-BBBB-CCCC-{i:04d}"


async def test_failed_code_lookups_are_limited_per_shopper(start_service):
    service = await start_service(lookup_client_failures_max=5)
    card = await funded_voucher(service)
    for i in range(5):
        status, found, _ = await search_code(service, wrong_code(i), "guesser")
        assert (status, found) == (200, [])
    status, body, headers = await search_code(service, card["redemptionCode"], "guesser")
    assert status == 429 and body["error"]["code"] == "too_many_failed_lookups"
    assert int(headers["Retry-After"]) >= 1, "even the right code is not answered once blocked"
    status, found, _ = await search_code(service, card["redemptionCode"], "rightful-holder")
    assert status == 200 and [c["id"] for c in found] == [card["id"]], "others are not slowed"


async def test_one_identity_guessing_is_stopped_by_the_default_limit(service):
    card = await funded_voucher(service)
    statuses = [(await search_code(service, wrong_code(i), "guesser"))[0] for i in range(12)]
    assert statuses[:10] == [200] * 10 and statuses[10:] == [429, 429]
    assert (await search_code(service, card["redemptionCode"], "guesser"))[0] == 429


async def test_rotating_identities_behind_one_caller_lock_no_other_shopper_out(service):
    """VTEX's hub is one caller for every shopper of a store: a hundred wrong codes, each with a
    new identity, must not deny a new shopper's right code on any surface."""
    card = await funded_voucher(service)
    guesses = await asyncio.gather(*(search_code(service, wrong_code(i), f"rotating-{i}") for i in range(100)))
    assert {status for status, _, _ in guesses} == {200}
    surfaces = (
        "/native/giftcards/_search",
        "/api/giftcards/_search",
        "/api/giftcardproviders/VtexGiftCard/giftcards/_search",
    )
    for path in surfaces:
        status, found, _ = await search_code(service, card["redemptionCode"], "new-shopper", path)
        assert status == 200, (path, status, found)
        items = found["items"] if isinstance(found, dict) else found
        assert [c["id"] for c in items] == [card["id"]], path
    status, merged, _ = await search_code(
        service, card["redemptionCode"], "new-shopper", "/api/giftcardproviders/_search"
    )
    assert status == 200 and [p["status"] for p in merged["providers"]] == ["ok"], merged


async def test_naming_a_victim_does_not_lock_the_victim_out(service):
    card = await funded_voucher(service)
    victim = {"email": "victim@example.com", "document": "12345678900"}
    for i in range(12):  # past the shopper limit, with the victim's e-mail and document
        await search_code(service, wrong_code(i), "attacker", email=victim["email"], document=victim["document"])
    status, found, _ = await search_code(service, card["redemptionCode"], "victim-profile", **victim)
    assert status == 200 and [c["id"] for c in found] == [card["id"]], "the victim's own identity is not the attacker's"

    for i in range(12):  # the victim's whole identity, through one caller (the provider key)
        await search_code(service, wrong_code(i), "victim-profile", **victim)
    assert (await search_code(service, card["redemptionCode"], "victim-profile", **victim))[0] == 429
    status, found, _ = await search_code(
        service, card["redemptionCode"], "victim-profile", "/api/giftcards/_search", **victim
    )
    assert status == 200 and found["items"][0]["id"] == card["id"], "another caller's lookups are not touched"


async def test_a_caller_past_its_failure_ceiling_is_slowed_never_denied(start_service):
    service = await start_service(lookup_caller_failures_slow_after=5, lookup_failure_delay_s=0.5)
    card = await funded_voucher(service)
    await asyncio.gather(*(search_code(service, wrong_code(i), f"rotating-{i}") for i in range(5)))
    started = time.monotonic()
    status, found, _ = await search_code(service, wrong_code(99), "yet-another")
    assert (status, found) == (200, []) and time.monotonic() - started >= 0.5, "a failure past the ceiling waits"
    started = time.monotonic()
    status, found, _ = await search_code(service, card["redemptionCode"], "a-shopper")
    assert status == 200 and found[0]["id"] == card["id"]
    assert time.monotonic() - started < 0.5, "a right code is answered at once"
    status, found, _ = await search_code(service, wrong_code(98), "hub-shopper", "/api/giftcards/_search")
    assert status == 200 and found["items"] == [], "another caller is neither slowed nor refused"


async def test_the_limit_holds_across_processes(start_service):
    first = await start_service(lookup_client_failures_max=4)
    second = await start_service(lookup_client_failures_max=4)
    card = await funded_voucher(first)
    for i in range(2):
        await search_code(first, wrong_code(i), "guesser")
        await search_code(second, wrong_code(10 + i), "guesser")
    # four failures in all, two through each process: both refuse the guesser, right code or not
    assert (await search_code(first, card["redemptionCode"], "guesser"))[0] == 429
    assert (await search_code(second, card["redemptionCode"], "guesser"))[0] == 429


async def test_successful_lookups_write_nothing(service, pool):
    card = await funded_voucher(service)
    for _ in range(3):
        assert (await search_code(service, card["redemptionCode"], "holder"))[0] == 200
    assert await pool.fetchval("select count(*) from lookup_failures") == 0


async def test_failed_lookups_keep_no_shopper_identity_in_clear(service, pool):
    await search_code(service, wrong_code(1), "profile-77", email="shopper@example.com", document="98765432100")
    stored = str([dict(row) for row in await pool.fetch("select * from lookup_failures")])
    assert stored != "[]"
    for secret in ("profile-77", "shopper@example.com", "98765432100", auth_key_of(service)):
        assert secret not in stored


def auth_key_of(service) -> str:
    return service.headers("/native")["X-PROVIDER-API-AppKey"]


# ---- roles hold for every audience ------------------------------------------------------------


async def provider_call(service, key: str, token: str, method: str, path: str, body=None):
    headers = {"X-PROVIDER-API-AppKey": key, "X-PROVIDER-API-AppToken": token, "Content-Type": "application/json"}
    async with service.session.request(method, service.base_url + path, json=body, headers=headers) as response:
        raw = await response.read()
        return response.status, (json.loads(raw) if raw else None)


async def test_a_view_only_provider_key_reads_but_cannot_create_or_credit(service, pool, database_url):
    card = await funded_voucher(service)
    out = await asyncio.to_thread(run_cli, database_url, "keys", "create", "--audience", "provider", "--role", "view")
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    key, token = lines["X-PROVIDER-API-AppKey"], lines["X-PROVIDER-API-AppToken"]
    card_path = f"/native/giftcards/{card['id']}"
    await eventually(lambda: _is(_status(provider_call(service, key, token, "GET", card_path)), 200))
    events_before = await pool.fetchval("select count(*) from events")

    credit = {"operation": "Credit", "value": 1000, "description": "d", "requestId": "steal"}
    issue = {"relationName": "r-view", "caption": "c", "profileId": "p"}
    for method, path, body in (("POST", card_path + "/transactions", credit), ("POST", "/native/giftcards", issue)):
        status, refusal = await provider_call(service, key, token, method, path, body)
        assert status == 403, (method, path, status)
        assert refusal["error"]["code"] == "forbidden" and "'edit' role" in refusal["error"]["message"]
    search = {"client": {"id": "holder"}, "cart": {"redemptionCode": card["redemptionCode"]}}
    status, found = await provider_call(service, key, token, "POST", "/native/giftcards/_search", search)
    assert status == 200 and [c["id"] for c in found] == [card["id"]], "a search is a read"
    assert await pool.fetchval("select count(*) from events") == events_before
    status, shown = await provider_call(service, key, token, "GET", card_path)
    assert status == 200 and shown["balance"] == 5


async def test_an_edit_only_provider_key_cannot_read(service, pool):
    card = await funded_voucher(service)
    key, token = await auth.create_key(pool, auth.PROVIDER, (auth.EDIT,))
    path = f"/native/giftcards/{card['id']}/transactions"
    credit = {"operation": "Credit", "value": 1, "description": "d", "requestId": "edit-only"}
    await eventually(lambda: _is(_status(provider_call(service, key, token, "POST", path, credit)), 200))
    status, refusal = await provider_call(service, key, token, "GET", path)
    assert status == 403 and refusal["error"]["code"] == "forbidden" and "'view' role" in refusal["error"]["message"]


async def _status(call) -> int:
    return (await call)[0]
