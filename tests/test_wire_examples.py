"""Every answer carries the fields VTEX's own examples show for its operation (issue 14).

The schemas mark few fields required, so a schema check passes an answer that leaves out
``balance`` or ``provider``; typed VTEX clients are written from the examples. Here each
operation of the three surfaces is driven over real loopback HTTP, and its answer's keys are
compared, at every depth, with the keys of the examples in ``../shared/spec``:

- a key every example of the operation shows and the answer lacks is *missing*: always a failure;
- a key no example shows is *extra*: allowed only when ``EXTRAS`` names it, with the reason.

The failure message names each missing or extra key, its operation, surface and place.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.openapi import examples, operation, require_spec, requires_spec
from tests.providers.reference import start_reference_provider
from tests.test_contract_native import OPS, card_request, order_info, search_request
from tests.test_hub import register

pytestmark = requires_spec

HUB_OPS = {
    "create_card": "CreateGiftCardinGiftCardProvider",
    "search": "GetGiftCardfromGiftCardProvider",
    "get_card": "GetGiftCardfromGiftCardProviderbyID",
    "list_transactions": "ListAllGiftCardTransactions",
    "create_transaction": "CreateGiftCardTransaction",
    "get_transaction": "GetGiftCardTransactionbyID",
    "authorization": "GetGiftCardAuthorizationTransaction",
    "settle": "CreateGiftCardSettlementTransaction",
    "list_settlements": "ListAllGiftCardSettlementTransactions",
    "cancel": "CreateGiftCardCancellationTransaction",
    "list_cancellations": "ListAllGiftCardCancellationTransactions",
    "list_providers": "ListAllGiftCardProviders",
    "get_provider": "GetGiftCardProviderbyID",
    "put_provider": "Create/UpdateGiftCardProviderbyID",
    "delete_provider": "DeleteGiftCardProviderbyID",
}
# spec -> (where the service mounts it, operation key -> operationId). Hub paths carry /api already.
SURFACES = {
    "hub": ("", HUB_OPS),
    "native": ("/api", {key: ids["native"] for key, ids in OPS.items()}),
    "provider": ("/native", {key: ids["provider"] for key, ids in OPS.items()}),
}

_CARD_EXTRAS = {
    "relationName": "the native API's create and its guide show it on the card",
    "caption": "the native API's create and its guide show it on the card",
    "discount": "deprecated, always false; the hub's and the Provider's get card examples show it",
    "transaction": "NOTES 8.4: the guides and native answers name the link `transaction`; we send both keys",
    "transactions": "the hub's and the native examples name the link `transactions`",
    "currencyCode": "ISO 4217 code of the card, in every other card example",
    "balance": "issue 14.1: typed hub clients read the created card's balance",
    "redemptionToken": "issue 14.1: typed hub clients read the created card's token",
    "redemptionCode": "DESIGN: the create answer shows the full code, once",
}
_ECHO_EXTRAS = {
    name: "the Provider Protocol's create echoes the request (NOTES 3.4); the hub passes the native echo on"
    for name in ("restrictedToOwner", "multipleRedemptions", "multipleCredits", "profileId", "emissionDate")
}
_HUB_CARD_EXTRAS = {
    "provider": "NOTES 1: the hub adds `provider` to cards",
    "_self": "the hub links every card to itself, as in its _search items",
}
_TRANSACTION_DETAIL_EXTRAS = {
    "cardId": "the reference typings and the native guide carry the card id on transactions",
    "id": "the reference typings and the native guide carry the transaction id",
    "orderInfo": "issue 14.2: what the caller sent with the transaction (reference typing GiftCardTransaction)",
}
_SEARCH_ITEM_EXTRAS = {
    "caption": "NOTES 3.2: the reference typings and the data-structures guide show it on search items",
    "relationName": "NOTES 3.2: the reference typings show it on search items",
    "currencyCode": "NOTES 3.2: the data-structures guide shows card fields on search items",
    "redemptionToken": "issue 21: the card's token, for the hub to send back with a transaction as from GET card",
}

# (spec, operationId) -> {extra key: why it is there}. Keys are compared at every depth by name.
EXTRAS: dict[tuple[str, str], dict[str, str]] = {
    ("hub", "CreateGiftCardinGiftCardProvider"): {**_CARD_EXTRAS, **_ECHO_EXTRAS, **_HUB_CARD_EXTRAS},
    ("hub", "GetGiftCardfromGiftCardProviderbyID"): {**_CARD_EXTRAS, **_HUB_CARD_EXTRAS},
    ("hub", "GetGiftCardfromGiftCardProvider"): _SEARCH_ITEM_EXTRAS,
    ("hub", "ListAllGiftCardTransactions"): {"provider": "issue 14.3: typed clients read {provider, cardId, id}"},
    ("hub", "CreateGiftCardTransaction"): {"provider": "issue 14.3: the same item as the transaction list's"},
    ("hub", "GetGiftCardTransactionbyID"): _TRANSACTION_DETAIL_EXTRAS,
    ("hub", "Create/UpdateGiftCardProviderbyID"): {"caption": "the GET and list examples show the provider's caption"},
    ("native", "CreateGiftCard"): {"discount": _CARD_EXTRAS["discount"], "transaction": _CARD_EXTRAS["transaction"]},
    ("native", "GetGiftCardbyID"): {
        name: _CARD_EXTRAS[name] for name in ("relationName", "caption", "discount", "transaction")
    },
    ("native", "SearchGiftCardsfromcartdata"): {"redemptionToken": _SEARCH_ITEM_EXTRAS["redemptionToken"]},
    ("native", "GetGiftCardTransactions"): {"cardId": "the native guide's examples include it"},
    ("native", "CreateGiftCardTransaction"): {"cardId": "the native guide's examples include it"},
    ("native", "GetGiftCardTransactionbyID"): _TRANSACTION_DETAIL_EXTRAS,
    ("provider", "CreateGiftCard"): _CARD_EXTRAS,
    ("provider", "GetGiftCardbyID"): {name: _CARD_EXTRAS[name] for name in ("relationName", "caption", "transaction")},
    ("provider", "ListAllGiftCards"): _SEARCH_ITEM_EXTRAS,
    ("provider", "GetGiftCardTransactionbyID"): {**_TRANSACTION_DETAIL_EXTRAS, "requestId": "the hub's example has it"},
}


class Keys:
    """The key names the examples of one operation show: ``shown`` by any, ``always`` by every one."""

    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples

    def paths(self, sample: Any, where: str = "$") -> Iterator[tuple[str, str]]:
        """(place, key) for every key at every depth; list items are one place, ``[]``."""
        if isinstance(sample, dict):
            for key, value in sample.items():
                yield where, key
                yield from self.paths(value, f"{where}.{key}")
        elif isinstance(sample, list):
            for item in sample:
                yield from self.paths(item, f"{where}[]")

    def shown(self) -> set[tuple[str, str]]:
        return {path for sample in self.samples for path in self.paths(sample)}

    def always(self) -> set[tuple[str, str]]:
        """Keys every list item of every example shows (a key only some items show is optional)."""
        every: set[tuple[str, str]] | None = None
        for sample in self.samples:
            for item in sample if isinstance(sample, list) else [sample]:
                found = set(self.paths(item, "$[]" if isinstance(sample, list) else "$"))
                every = found if every is None else every & found
        return every or set()


def example_answers(spec: str) -> dict[str, list[Any]]:
    answers: dict[str, list[Any]] = {}
    for op_id, status, example in examples(spec):
        if status == "200":
            answers.setdefault(op_id, []).append(example)
    return answers


def excused(path: tuple[str, str], allowed: dict[str, str]) -> bool:
    """An allowed extra key brings what it holds along (orderInfo holds whatever the caller sent)."""
    where, key = path
    return key in allowed or any(part in allowed for part in where.replace("[]", "").split(".")[1:])


def differences(spec: str, op_id: str, answer: Any, samples: list[Any]) -> list[str]:
    expected = Keys(samples)
    ours = Keys([answer])
    allowed = EXTRAS.get((spec, op_id), {})
    missing = sorted(expected.always() - ours.shown())
    extra = sorted(path for path in ours.shown() - expected.shown() if not excused(path, allowed))
    return [f"{spec} {op_id}: missing {key!r} at {where}" for where, key in missing] + [
        f"{spec} {op_id}: extra {key!r} at {where} (not in VTEX's example; add it to EXTRAS with the reason)"
        for where, key in extra
    ]


class Driver:
    """Calls one surface's operations by key and keeps each 200 answer by operationId."""

    def __init__(self, service, spec: str) -> None:
        self.service = service
        self.spec = spec
        self.base, self.ids = SURFACES[spec]
        self.answers: dict[str, Any] = {}

    async def __call__(self, key: str, body: Any = None, *, card: str = "", tx: str = "", provider: str = "") -> Any:
        op = operation(self.spec, self.ids[key])
        path = self.base + op.url_path(
            giftCardProviderId=provider or "VtexGiftCard", giftCardId=card, transactionId=tx, tId=tx
        )
        status, answer, _ = await self.service.call(op.method, path, body)
        assert status == 200, (self.spec, op.operation_id, path, status, answer)
        self.answers[op.operation_id] = answer
        return answer


async def drive_every_operation(service, spec: str) -> dict[str, Any]:
    call = Driver(service, spec)
    owner = f"ana+{uuid.uuid4().hex[:8]}@example.com"
    card = await call("create_card", card_request("provider" if spec != "native" else "native", owner))
    card_id, code = card["id"], card["redemptionCode"]
    token = card["redemptionToken"]
    load = {"operation": "Credit", "value": 500, "requestId": "load", "redemptionCode": code, "redemptionToken": token}
    await call("create_transaction", load, card=card_id)
    await call("search", search_request(code=code, email=owner))
    await call("get_card", card=card_id)
    debit = {**load, "operation": "Debit", "value": 120.5, "requestId": "order", "orderInfo": order_info(owner)}
    transaction_id = (await call("create_transaction", debit, card=card_id))["id"]
    await call("list_transactions", card=card_id)
    await call("get_transaction", card=card_id, tx=transaction_id)
    await call("authorization", card=card_id, tx=transaction_id)
    await call("settle", {"value": 100, "requestId": "s"}, card=card_id, tx=transaction_id)
    await call("list_settlements", card=card_id, tx=transaction_id)
    await call("cancel", {"value": 20.5, "requestId": "c"}, card=card_id, tx=transaction_id)
    await call("list_cancellations", card=card_id, tx=transaction_id)
    if spec == "hub":
        async with start_reference_provider() as provider:
            status, registered, _ = await register(service, "Acme", provider, caption="Acme cards")
            assert status == 200, registered
            call.answers[HUB_OPS["put_provider"]] = registered
            await call("get_provider", provider="Acme")
            await call("list_providers")
            await call("delete_provider", provider="Acme")
    return call.answers


@pytest.mark.parametrize("spec", sorted(SURFACES))
async def test_answers_carry_every_field_vtex_examples_show(service, spec):
    require_spec()
    answers = await drive_every_operation(service, spec)
    samples = example_answers(spec)
    assert set(samples) <= set(answers), f"operations with an example not driven: {set(samples) - set(answers)}"
    problems = [line for op_id in samples for line in differences(spec, op_id, answers[op_id], samples[op_id])]
    assert problems == [], "\n".join(problems)


def test_the_comparison_names_what_is_missing_and_what_is_extra():
    """The comparison itself: a missing key and an unlisted key fail, each named with its place."""
    require_spec()
    card_samples = example_answers("hub")["GetGiftCardfromGiftCardProviderbyID"]
    card = {key: value for key, value in card_samples[0].items() if key != "balance"}
    assert differences("hub", "GetGiftCardfromGiftCardProviderbyID", {**card, "colour": "red"}, card_samples) == [
        "hub GetGiftCardfromGiftCardProviderbyID: missing 'balance' at $",
        "hub GetGiftCardfromGiftCardProviderbyID: extra 'colour' at $ "
        "(not in VTEX's example; add it to EXTRAS with the reason)",
    ]
    detail_samples = example_answers("hub")["GetGiftCardTransactionbyID"]
    detail = {**detail_samples[0], "settlement": {"href": "x", "rel": "self"}, "orderInfo": {"anything": 1}}
    assert differences("hub", "GetGiftCardTransactionbyID", detail, detail_samples) == [
        "hub GetGiftCardTransactionbyID: extra 'rel' at $.settlement "
        "(not in VTEX's example; add it to EXTRAS with the reason)",
    ], "nested keys are compared; what an allowed extra (orderInfo) holds is the caller's"
    providers = example_answers("hub")["ListAllGiftCardProviders"]
    without_caption = [{key: value for key, value in item.items() if key != "caption"} for item in providers[0]]
    assert differences("hub", "ListAllGiftCardProviders", without_caption, providers) == [], "caption is optional"
