"""Shoppers' personal data (ledger.postgres.personal_data): sealed per person in the events, read back through
the API while the person's key exists, erased everywhere by ``giftcard privacy forget`` with the
ledger still verifiable, and exported by ``giftcard privacy export``."""

from __future__ import annotations

import csv
import json
from decimal import Decimal

import pytest

import ledger.postgres.personal_data
from hub.webhooks.events import render
from ledger.application.commands import Ledger
from ledger.domain import errors, topics
from ledger.domain.giftcard import Client
from ledger.eventstore.store import EventStore, NewEvent
from ledger.postgres.tenancy import DEFAULT_TENANT, tenant_scope
from projections import read_models
from projections.runner import ProjectionRunner
from tests.audit_ledgers import NATIVE, finance_cli
from tests.cards import issue
from tests.conftest import services_on
from tests.test_contract_native import card_body, order_info
from tests.test_db_roles import service_role_url  # noqa: F401 (a fixture)
from tests.test_tenants import store_of

pytestmark = pytest.mark.also_on_citus

ANA = "ana@example.com"
BRUNO = "bruno@example.com"
# Ana's values from order_info(ANA), each long enough never to turn up inside base64 by chance.
ACME, GLOBEX = "acme", "globex"
ANA_VALUES = (ANA, "12345678909", "+5521987654321", "1990-05-01", "Ana Souza", "Praia de Botafogo", "22250-040")


def bruno_order() -> dict:
    sent = order_info(BRUNO)
    sent["clientProfile"] |= {"firstName": "Bruno", "lastName": "Lima", "document": "98765432100"}
    sent["shipping"] |= {"receiverName": "Bruno Lima", "street": "Rua Voluntarios da Patria"}
    return sent


@pytest.fixture(autouse=True)
def forgets_seen_at_once(monkeypatch):
    """Every ledger asks for forgotten keys at each command here, not every few seconds."""
    monkeypatch.setattr(ledger.postgres.personal_data, "FORGOTTEN_POLL_S", 0.0)


@pytest.fixture
async def service(start_service):
    return await start_service(privacy_poll_s=0.0)


async def held_text(pool) -> str:
    """Everything the database holds that could carry personal data, as text."""
    parts = [await pool.fetchval("select coalesce(string_agg(data::text || metadata::text, E'\\n'), '') from events")]
    tables = ["card_lookup", "webhook_dead_letters"] + [t for p in read_models(NATIVE) for t in p.tables]
    for table in tables:
        parts.append(await pool.fetchval(f"select coalesce(string_agg(t::text, E'\\n'), '') from {table} t"))
    snapshots = await pool.fetch("select state from snapshots")
    parts += [row["state"].decode("latin-1") for row in snapshots]
    return "\n".join(parts)


async def shop(service, profile_id: str, sent: dict) -> tuple[str, str]:
    """A card owned by ``profile_id``, loaded with 500 and debited with ``sent`` as orderInfo: (card, debit)."""
    status, card, _ = await service.call("POST", "/api/giftcards", card_body(profileId=profile_id))
    assert status == 200, card
    transactions = f"/api/giftcards/{card['id']}/transactions"
    status, _, _ = await service.call("POST", transactions, {"operation": "Credit", "value": 500, "requestId": "l"})
    assert status == 200
    debit = {"operation": "Debit", "value": 172.82, "requestId": "order", "orderInfo": sent}
    status, created, _ = await service.call("POST", transactions, debit)
    assert status == 200, created
    return card["id"], created["id"]


async def read_order_info(service, card_id: str, transaction_id: str) -> dict:
    status, detail, _ = await service.call("GET", f"/api/giftcards/{card_id}/transactions/{transaction_id}")
    assert status == 200, detail
    return detail["orderInfo"]


async def test_personal_data_is_sealed_read_back_then_erased_with_the_ledger_still_verifiable(
    service, pool, database_url, tmp_path
):
    ana_sent, bruno_sent = order_info(ANA), bruno_order()
    ana_card, ana_debit = await shop(service, ANA, ana_sent)
    bruno_card, bruno_debit = await shop(service, BRUNO, bruno_sent)
    await ProjectionRunner(pool, read_models(NATIVE)).catch_up()

    held = await held_text(pool)
    assert not [v for v in ANA_VALUES + (BRUNO, "98765432100") if v in held], "personal data stored in clear"
    assert await read_order_info(service, ana_card, ana_debit) == ana_sent
    assert await read_order_info(service, bruno_card, bruno_debit) == bruno_sent

    code, out, err = await finance_cli(database_url, "privacy", "export", "--profile", ANA)
    assert code == 0, err
    exported = json.loads(out)
    assert exported["cardsOwned"] == [{"tenant": "default", "cardId": ana_card}]
    debit = next(e for e in exported["events"] if e["transactionId"] == ana_debit)
    assert debit["clientProfile"] == ana_sent["clientProfile"] and debit["shipping"] == ana_sent["shipping"]
    assert BRUNO not in out

    code, out, err = await finance_cli(database_url, "privacy", "forget", "--profile", ANA, "--actor", "dpo")
    assert code == 0, err
    assert "forgot 1 data key(s) and 1 card owner lookup(s)" in out, out

    erased = await read_order_info(service, ana_card, ana_debit)
    assert erased == {**ana_sent, "clientProfile": None, "shipping": None}, "the documented erased shape"
    assert await read_order_info(service, bruno_card, bruno_debit) == bruno_sent, "another person stays readable"
    status, card, _ = await service.call("GET", f"/api/giftcards/{ana_card}")
    assert status == 200 and card["balance"] == 327.18
    status, again, _ = await service.call(
        "POST", f"/api/giftcards/{ana_card}/transactions", {"operation": "Debit", "value": 1, "requestId": "after"}
    )
    assert status == 200, again

    await ProjectionRunner(pool, read_models(NATIVE)).catch_up()
    held = await held_text(pool)
    assert not [v for v in ANA_VALUES if v in held]
    output = tmp_path / "transactions.csv"
    code, out, err = await finance_cli(
        database_url, "export", "transactions", "--format", "csv", "--output", str(output)
    )
    assert code == 0, err
    rows = list(csv.DictReader(output.open()))
    assert len([r for r in rows if r["card_id"] == ana_card]) == 3, "every row of the forgotten person's card is kept"
    assert not [v for v in ANA_VALUES if v in output.read_text()]

    code, out, err = await finance_cli(database_url, "audit", "verify")
    assert code == 0, out + err
    code, out, err = await finance_cli(database_url, "audit", "card", ana_card, "--json")
    assert code == 0, err
    assert not [v for v in ANA_VALUES if v in out]

    code, out, err = await finance_cli(database_url, "privacy", "forget", "--profile", ANA)
    assert code == 0 and "nothing held for that person any more" in out, out + err
    recorded = await pool.fetch(
        "select data::text as data, metadata::text as metadata from events where type = $1", "PersonalDataForgotten"
    )
    assert len(recorded) == 1, "forget is idempotent: one erasure, one event"
    assert json.loads(recorded[0]["data"]) == {"keys_destroyed": 1, "owners_erased": 1, "actor": "dpo"}


class InStore:
    """A tenant's key pairs (tests.test_tenants.Store) answering as ``service.call`` does, for ``shop``."""

    def __init__(self, store) -> None:
        self.store = store

    async def call(self, method: str, path: str, body=None):
        return *(await self.store.call(method, path, body)), None


async def test_forget_and_export_with_a_tenant_act_in_that_store_only(
    service_role_url,  # noqa: F811
    pool,
    database_url,
    clock,
):
    async with services_on(service_role_url, clock=clock) as start:
        service = await start(privacy_poll_s=0.0)
        stores = {t: InStore(await store_of(service, pool, t)) for t in (ACME, GLOBEX)}
        ana_sent = order_info(ANA)  # the same shopper, with the same profileId and e-mail, in both stores
        shopped = {t: await shop(store, ANA, ana_sent) for t, store in stores.items()}
        acme_card, acme_debit = shopped[ACME]
        globex_card, globex_debit = shopped[GLOBEX]
        # A Debit recorded before personal data was sealed (migration 0015) names her in clear: the default store's.
        legacy = {"transaction_id": "legacy", "order_info": {"orderId": "o", "clientProfile": {"email": ANA}}}
        with tenant_scope(DEFAULT_TENANT):
            await EventStore(pool).append("legacy-card", 0, [NewEvent(topics.DEBITED, json.dumps(legacy).encode())])

        code, out, err = await finance_cli(database_url, "privacy", "export", "--profile", ANA, "--tenant", ACME)
        assert code == 0, err
        exported = json.loads(out)
        assert exported["cardsOwned"] == [{"tenant": ACME, "cardId": acme_card}]
        assert {e["cardId"] for e in exported["events"]} == {acme_card}, "neither globex's nor the default store's"
        debit = next(e for e in exported["events"] if e["transactionId"] == acme_debit)
        assert debit["tenant"] == ACME and debit["clientProfile"] == ana_sent["clientProfile"]
        code, out, err = await finance_cli(database_url, "privacy", "export", "--profile", ANA)
        assert code == 0, err
        everywhere = json.loads(out)
        assert {c["tenant"] for c in everywhere["cardsOwned"]} == {ACME, GLOBEX}, "no --tenant: every store"
        assert {e["cardId"] for e in everywhere["events"]} == {acme_card, globex_card, "legacy-card"}

        for tenant, refusal in (("nosuch", "no store (tenant) 'nosuch'"), ("Not An Account", "not a VTEX account")):
            for command in ("forget", "export"):
                code, out, err = await finance_cli(
                    database_url, "privacy", command, "--profile", ANA, "--tenant", tenant
                )
                assert code == 2 and refusal in err, out + err
        assert await pool.fetchval("select count(*) from personal_data_keys where wrapped_key is null") == 0

        code, out, err = await finance_cli(database_url, "privacy", "forget", "--profile", ANA, "--tenant", ACME)
        assert code == 0, err
        assert (
            "store acme: forgot 1 data key(s) and 1 card owner lookup(s)" in out and "acted in 1 store(s): acme" in out
        )
        assert await read_order_info(stores[ACME], acme_card, acme_debit) == {
            **ana_sent,
            "clientProfile": None,
            "shipping": None,
        }
        assert await read_order_info(stores[GLOBEX], globex_card, globex_debit) == ana_sent, (
            "the other store keeps hers"
        )
        code, out, err = await finance_cli(database_url, "privacy", "export", "--profile", ANA, "--tenant", GLOBEX)
        assert code == 0, err
        assert json.loads(out)["cardsOwned"] == [{"tenant": GLOBEX, "cardId": globex_card}]
        assert (
            next(e for e in json.loads(out)["events"] if e["transactionId"] == globex_debit)["shipping"]
            == ana_sent["shipping"]
        )
        code, out, err = await finance_cli(database_url, "privacy", "forget", "--profile", ANA, "--tenant", ACME)
        assert code == 0 and "nothing held for that person any more in store acme" in out, out + err

        code, out, err = await finance_cli(database_url, "privacy", "forget", "--profile", ANA)
        assert code == 0, err
        assert "store globex: forgot 1 data key(s)" in out and "acted in 1 store(s): globex" in out, out
        assert await read_order_info(stores[GLOBEX], globex_card, globex_debit) == {
            **ana_sent,
            "clientProfile": None,
            "shipping": None,
        }
    erasures = await pool.fetch(
        "select tenant_id, data from events where type = $1 order by tenant_id", "PersonalDataForgotten"
    )
    assert [r["tenant_id"] for r in erasures] == [ACME, GLOBEX], "each store's erasure is an event of that store"


async def test_a_forgotten_owner_is_no_longer_found_by_search(service, database_url):
    await shop(service, ANA, order_info(ANA))
    search = {"client": {"id": "x", "email": ANA, "document": "1"}, "cart": {}}
    status, found, _ = await service.call("POST", "/native/giftcards/_search", search)
    assert status == 200 and len(found) == 1, found
    code, out, err = await finance_cli(database_url, "privacy", "forget", "--profile", ANA)
    assert code == 0, err
    status, found, _ = await service.call("POST", "/native/giftcards/_search", search)
    assert status == 200 and found == [], found


async def test_webhook_payloads_carry_no_personal_data(ledger: Ledger, store: EventStore):
    card = (await issue(ledger, profile_id=ANA)).card
    card_id = str(card.id)
    await ledger.create_transaction(card_id, operation="Credit", value=Decimal(500), description="l", request_id="l")
    await ledger.create_transaction(
        card_id, operation="Debit", value=Decimal(1), description="d", request_id="d", order_info=order_info(ANA)
    )
    for event in await store.read_stream(card_id):
        payload = render(event, "USD").decode()
        data = json.loads(payload)["data"]
        assert "profileId" not in data and not {"clientProfile", "shipping"} & set(data.get("orderInfo") or {})
        assert not [v for v in ANA_VALUES if v in payload]
    debited = render((await store.read_stream(card_id))[-1], "USD")
    assert json.loads(debited)["data"]["orderInfo"]["orderId"] == "1234567890123-01"


async def test_snapshots_hold_the_owner_sealed_and_still_check_ownership(store: EventStore, clock, pool, database_url):
    writer = Ledger(store, code_key=b"k" * 32, clock=clock, snapshot_interval_events=2)
    card_id = str((await issue(writer, profile_id=ANA, restricted_to_owner=True)).card.id)
    for n in range(3):
        await writer.create_transaction(
            card_id, operation="Credit", value=Decimal(5), description="l", request_id=f"{n}"
        )
    await writer.snapshots_saved()
    state = await pool.fetchval("select state from snapshots where stream_id = $1", card_id)
    assert state is not None and ANA.encode() not in state

    reader = Ledger(store, code_key=b"k" * 32, clock=clock)  # loads from the snapshot
    debit = dict(operation="Debit", value=Decimal(1), description="d")
    with pytest.raises(errors.NotOwner):
        await reader.create_transaction(card_id, request_id="x", client=Client(email=BRUNO), **debit)
    await reader.create_transaction(card_id, request_id="y", client=Client(email=ANA), **debit)
    code, out, err = await finance_cli(database_url, "audit", "verify")
    assert code == 0, out + err
