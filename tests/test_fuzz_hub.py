"""Property: no request to the Gift Card Hub API, however malformed, gets a 5xx.

The 15 operations of the Hub spec (``/api/giftcardproviders``, spec ``"hub"``) are driven over
real loopback HTTP the way ``test_contract_native.test_fuzzed_requests_never_get_a_5xx`` drives
the native surfaces: bodies drawn from each operation's request schema (tests/fuzz.py), half of
them mutated adversarially or replaced by raw non-JSON bytes; path ids that are real (the native
provider ``VtexGiftCard`` with cards and transactions created in the test), other spellings,
unknown or garbage (path traversal included); now and then missing or wrong credentials, odd
content types and query strings, and an oversized header.

The registry operations (PUT/DELETE a provider) draw random provider ids and bodies whose
``serviceUrl`` is garbage, an internal address (metadata endpoint, private ranges, numeric
spellings of loopback) or an allowed loopback one. Only IP literals and ``localhost`` are used as
hosts, so no example waits on DNS. Card operations never aim at a registered external provider
(its unreachable serviceUrl would rightly be a 502/503), only at the native one or at ids that
name nothing.

Every answer must be a 2xx, or a 4xx ``{"error": {"code", "message"}}`` that wrote nothing
(rows in ``events``, ``providers``, ``card_lookup`` counted before and after), or an empty
401/403 for bad credentials; never a 5xx. The one exception to the JSON error shape is
aiohttp's own answer to an oversized header, which may be plain text (only ``< 500`` is
required of it). Runs are derandomized and not shrunk, like the native fuzz; the failing request
is printed whole. ``GIFTCARD_HUB_FUZZ_EXAMPLES`` sets the examples per operation (default 20).
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import fuzz
from tests.fuzz import FuzzRequest
from tests.openapi import Operation, operations, request_schema, require_spec, requires_spec
from tests.test_contract_native import (
    CONTENT_TYPES,
    OPERATION_IDS,
    REST_RANGES,
    World,
    assert_refusal_body,
    hints,
    native_world,
    send,
)

NATIVE_ID = "VtexGiftCard"
EXTERNAL_IDS = ("ext-alpha", "ext-beta")  # registered by the world fixture (and deleted/re-put by the fuzz)

HUB_EXAMPLES = int(os.environ.get("GIFTCARD_HUB_FUZZ_EXAMPLES", "20"))
HUB_FUZZ_SETTINGS = settings(
    max_examples=HUB_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=False,
)

AUTH_STATUS = {"valid": None, "missing": 401, "wrong": 403, "other-audience": 403}
OVERSIZED_HEADER = "x" * 20_000  # past aiohttp's 8190-byte field limit: it answers 400 (maybe 431) itself

REGISTRY_OPS = {"Create/UpdateGiftCardProviderbyID", "DeleteGiftCardProviderbyID"}
READS = {
    "ListAllGiftCardProviders",
    "GetGiftCardProviderbyID",
    "GetGiftCardfromGiftCardProvider",  # _search
    "GetGiftCardfromGiftCardProviderbyID",
    "ListAllGiftCardTransactions",
    "GetGiftCardTransactionbyID",
    "GetGiftCardAuthorizationTransaction",
    "ListAllGiftCardSettlementTransactions",
    "ListAllGiftCardCancellationTransactions",
}

SERVICE_URLS = (
    "http://127.0.0.1:9/provider",  # allowed (tests allow 127.0.0.0/8): may be accepted
    "https://127.0.0.1:8443",
    "http://localhost:9",
    "http://10.0.0.1/",
    "http://192.168.1.1:8080/x",
    "http://172.16.0.1",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://[::1]:80/",
    "http://[::ffff:10.0.0.1]/",
    "http://0.0.0.0:80",
    "http://2130706433/",  # 127.0.0.1 as one number
    "http://0x7f000001/",
    "http://127.1/",
    "http://0177.0.0.1/",
    "http://user:pw@169.254.169.254/",
    "http://127.0.0.1:99999/",
    "http://127.0.0.1:-1/",
    "http://127.0.0.1:port/",
    "http://",
    "http:///path",
    "https://[::1",
    "ftp://127.0.0.1/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "javascript:alert(1)",
    "//127.0.0.1/",
    "127.0.0.1",
    "http://127.0.0.1/\r\nX-Injected: 1",
    "http://127.0.0.1/\x00",
    "http://127.0.0.1/" + "a" * 5000,
    "",
)


@pytest.fixture
async def world(service) -> World:
    """Real native cards and transactions (made through /native), and two registered external providers."""
    world = await native_world(service, "hubfuzz-owner@example.com", "hubfuzz-vip@example.com")
    for provider_id in EXTERNAL_IDS:
        status, answer, _ = await service.call(
            "PUT",
            f"/api/giftcardproviders/{provider_id}",
            {"serviceUrl": "http://127.0.0.1:9/provider", "appKey": "k", "appToken": "t", "caption": provider_id},
        )
        assert status == 200, (provider_id, answer)
    return world


async def write_counts(pool) -> tuple[int, int, int]:
    """Rows only a write changes: events, registered providers, card lookups."""
    row = await pool.fetchrow(
        "select (select count(*) from events) as e, (select count(*) from providers) as p,"
        " (select count(*) from card_lookup) as l"
    )
    return row["e"], row["p"], row["l"]


def hub_operations() -> dict[str, Operation]:
    return {op.operation_id: op for op in operations("hub")}


def registry_provider_ids() -> st.SearchStrategy[str]:
    """Provider ids for the registry PUT/DELETE: registered, new, the native one, or invalid/garbage."""
    new_id = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20).map(
        lambda text: "fz" + text
    )
    return st.one_of(
        st.sampled_from([*EXTERNAL_IDS, NATIVE_ID, "vtexgiftcard", "-x", "_x", ".", "a" * 64, "a" * 65, "x.y"]),
        new_id,
        fuzz.garbage_ids(),
    )


def card_provider_ids() -> st.SearchStrategy[str]:
    """Provider ids for card operations: mostly the native provider; never a registered external one."""
    return st.sampled_from([NATIVE_ID] * 7 + ["unknown", "garbage", "lower"]).flatmap(
        lambda kind: {
            "unknown": st.sampled_from(["NoSuchProvider", "fz-unknown", "VtexGiftCard2", "_search"]),
            "garbage": fuzz.garbage_ids(),
            "lower": st.sampled_from(["vtexgiftcard", "VTEXGIFTCARD", "VtexGiftCard%00", "VtexGiftCard%2F.."]),
        }.get(kind, st.just(NATIVE_ID))
    )


@st.composite
def card_targets(draw, world: World) -> tuple[str, str]:
    transaction = draw(st.sampled_from([world.debit, world.credit]))
    kind = draw(st.sampled_from(["exact"] * 5 + ["spelling", "other-card", "garbage-card", "garbage-transaction"]))
    if kind == "spelling":
        return draw(st.sampled_from(fuzz.uuid_spellings(world.card))), transaction
    if kind == "other-card":
        return world.restricted, transaction
    if kind == "garbage-card":
        return draw(fuzz.garbage_ids()), transaction
    if kind == "garbage-transaction":
        return world.card, draw(fuzz.garbage_ids())
    return world.card, transaction


def registry_hints(provider_id: str) -> dict[str, st.SearchStrategy]:
    return {
        "serviceUrl": st.sampled_from(SERVICE_URLS),
        "id": st.sampled_from([provider_id, provider_id, NATIVE_ID, "other-id"]),
        "appKey": st.one_of(fuzz.plain_text, st.sampled_from(["", " ", "\x00"])),
        "appToken": st.one_of(fuzz.plain_text, st.sampled_from(["", " ", "\x00"])),
        "oauthProvider": st.sampled_from(["vtex", "", " ", "other"]),
        "caption": fuzz.plain_text,
    }


@st.composite
def fuzz_requests(draw, op: Operation, world: World) -> FuzzRequest:
    if op.operation_id in REGISTRY_OPS:
        provider_id = draw(registry_provider_ids(), label="providerId")
        card_id, transaction_id = world.card, world.debit
    else:
        provider_id = draw(card_provider_ids(), label="providerId")
        card_id, transaction_id = draw(card_targets(world), label="ids")
    path = op.path.format(
        giftCardProviderId=provider_id, giftCardId=card_id, transactionId=transaction_id, tId=transaction_id
    )
    path += draw(st.sampled_from(["", "", "", "?an=store", "?ts=%00&ts=", "?x=%2e%2e%2f"]))

    # Hypothesis favours the ends of a range, so the rare cases sit in its middle.
    auth = {40: "missing", 41: "wrong", 42: "other-audience"}.get(draw(st.integers(min_value=0, max_value=79)), "valid")
    headers: dict[str, str] = {}
    oversized = draw(st.integers(min_value=0, max_value=79)) in (37, 38)
    if oversized:
        headers[draw(st.sampled_from(["X-Fuzz", "x-vtex-operation-id", "REST-Range", "Accept"]))] = OVERSIZED_HEADER
    elif draw(st.booleans()):
        headers["x-vtex-operation-id"] = draw(st.sampled_from(OPERATION_IDS))
    ranged = op.method == "GET" or op.operation_id == "GetGiftCardfromGiftCardProvider"
    if ranged and not oversized and draw(st.booleans()):
        headers["REST-Range"] = draw(st.sampled_from(REST_RANGES))

    schema = request_schema("hub", op.operation_id)
    if schema is None:
        stray = draw(st.integers(min_value=0, max_value=3)) == 0
        body = draw(fuzz.raw_bodies(st.just({"a": 1}))) if stray else None
        return FuzzRequest(op.method, path, body, headers, auth, oversized)

    if not oversized and draw(st.integers(min_value=0, max_value=4)) == 0:
        headers["Content-Type"] = draw(st.sampled_from(CONTENT_TYPES))
    field_hints = registry_hints(provider_id) if op.operation_id in REGISTRY_OPS else hints(world)
    valid = fuzz.from_schema(schema, field_hints)
    kind = draw(st.sampled_from(["conforming", "conforming", "mutated", "raw"]))
    strategy = {"conforming": valid, "mutated": fuzz.mutated(valid), "raw": fuzz.raw_bodies(valid)}[kind]
    drawn = draw(strategy, label="body")
    body = drawn if isinstance(drawn, bytes) else fuzz.encode_json(drawn, ascii_only=draw(st.booleans()))
    return FuzzRequest(op.method, path, body, headers, auth, oversized)


def request_headers(service, request: FuzzRequest) -> dict[str, str]:
    headers = service.headers(request.path, request.headers)
    own = [name for name in headers if name.upper().startswith("X-VTEX-API-")]
    if request.auth == "missing":
        del headers[own[1]]
    elif request.auth == "wrong":
        headers[own[1]] = "not-the-token"
    elif request.auth == "other-audience":  # the provider surface's valid pair under the hub's names
        other = service.headers("/native/x")
        values = [v for k, v in other.items() if k.upper().startswith("X-PROVIDER-API-")]
        headers.update(zip(own, values, strict=True))
    return headers


def check_answer(op_id: str, request: FuzzRequest, status: int, raw: bytes, headers, wrote) -> None:
    where = f"\nrequest: {request!r}\nanswer: {status} {raw[:1000]!r}\nwrote (events, providers, card_lookup): {wrote}"
    assert status < 500, "5xx" + where
    assert 200 <= status < 300 or 400 <= status < 500, "neither 2xx nor 4xx" + where
    if request.oversized and 400 <= status < 500:
        assert wrote == (0, 0, 0), "a refused request (oversized header) wrote something" + where
        return  # aiohttp's own 400/431 for a header past its limit may be plain text
    if AUTH_STATUS[request.auth] is not None:
        assert status == AUTH_STATUS[request.auth] and raw == b"", f"{request.auth} credentials" + where
        assert wrote == (0, 0, 0), "a request without valid credentials wrote something" + where
        return
    if op_id in READS:
        assert wrote == (0, 0, 0), "a read (GET or _search) wrote something" + where
    if 200 <= status < 300:
        if raw:
            assert headers.get("Content-Type", "").startswith("application/json"), "2xx is not JSON" + where
            json.loads(raw)
        return
    assert_refusal_body(status, raw, headers, where)
    assert wrote == (0, 0, 0), f"a refused request ({status}) wrote something" + where


HUB_OPERATION_IDS = (
    "ListAllGiftCardProviders",
    "GetGiftCardProviderbyID",
    "Create/UpdateGiftCardProviderbyID",
    "DeleteGiftCardProviderbyID",
    "CreateGiftCardinGiftCardProvider",
    "GetGiftCardfromGiftCardProvider",
    "GetGiftCardfromGiftCardProviderbyID",
    "ListAllGiftCardTransactions",
    "CreateGiftCardTransaction",
    "GetGiftCardTransactionbyID",
    "GetGiftCardAuthorizationTransaction",
    "ListAllGiftCardSettlementTransactions",
    "CreateGiftCardSettlementTransaction",
    "ListAllGiftCardCancellationTransactions",
    "CreateGiftCardCancellationTransaction",
)


@requires_spec
def test_the_fuzzed_operations_are_exactly_the_hub_spec():
    require_spec()
    assert sorted(hub_operations()) == sorted(HUB_OPERATION_IDS)


@requires_spec
@pytest.mark.parametrize("op_id", HUB_OPERATION_IDS)
@HUB_FUZZ_SETTINGS
@given(data=st.data())
async def test_fuzzed_hub_requests_never_get_a_5xx(service, pool, world, op_id, data):
    require_spec()
    op = hub_operations()[op_id]
    request = data.draw(fuzz_requests(op, world), label="request")
    before = await write_counts(pool)
    status, raw, headers = await send(service, request, request_headers(service, request))
    after = await write_counts(pool)
    check_answer(op_id, request, status, raw, headers, tuple(a - b for a, b in zip(after, before, strict=True)))
