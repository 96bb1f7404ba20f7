"""``giftcard demo``: a realistic data set in a fresh database, for trying everything out.

Thousands of cards across currencies, loyalty cards (reloadable, found by their owner) and
vouchers (single use, found by code), Debits with partial and repeated settlements and
cancellations, a few expired cards, spread over the last month by driving the ledger's
clock; and an external provider: this very service's ``/native`` registered as a partner,
the way any VTEX-style hub would register it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from tqdm import tqdm

from hub.http import auth
from ledger.application.commands import IssueCard, Ledger
from ledger.application.providers import Credentials, ProviderRegistry
from ledger.domain.errors import DomainError
from ledger.domain.provider import ProviderSpec
from ledger.eventstore.store import EventStore
from ledger.postgres.credentials_cipher import CredentialsCipher
from ledger.postgres.instance_keys import instance_key

CURRENCIES = {
    "USD": ("25", "50", "100", "200"),
    "EUR": ("20", "50", "150"),
    "BRL": ("50", "100", "300"),
    "JPY": ("3000", "10000"),
}
DAYS = 30
PARTNER_ID = "DemoPartner"


@dataclass
class DemoClock:
    """The ledger's clock, walked through the last month so read models have history."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class DemoSummary:
    cards: int
    transactions: int
    settlements: int
    cancellations: int
    refused: int
    partner_registered: bool


async def fill(
    pool: asyncpg.Pool, *, cards: int, seed: int, native_id: str, base_url: str, secret_key: str | None
) -> DemoSummary:
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=DAYS)
    clock = DemoClock(start)
    ledger = Ledger(EventStore(pool), await instance_key(pool, "redemption-codes", secret_key), clock=clock)
    counts = {"transactions": 0, "settlements": 0, "cancellations": 0, "refused": 0}
    for n in tqdm(range(cards), desc="demo cards", unit="card", disable=None):
        clock.now = start + timedelta(seconds=DAYS * 86400 * n / cards)
        try:
            await one_card(ledger, rng, n, counts)
        except DomainError:
            counts["refused"] += 1  # a realistic refusal (e.g. insufficient funds): nothing written
    await ledger.snapshots_saved()
    registered = await register_partner(pool, native_id, base_url, CredentialsCipher(secret_key))
    return DemoSummary(cards=cards, partner_registered=registered, **counts)


async def one_card(ledger: Ledger, rng: random.Random, n: int, counts: dict[str, int]) -> None:
    currency = rng.choice(list(CURRENCIES))
    loyalty = rng.random() < 0.6
    now = ledger.clock()
    expires = now + timedelta(days=rng.choice((2, 365, 730))) if rng.random() > 0.05 else now + timedelta(hours=1)
    issued = await ledger.issue(
        IssueCard(
            relation_name=f"demo-{n:06d}",
            caption="Loyalty points" if loyalty else "Gift voucher",
            profile_id=f"shopper{rng.randrange(cards_per_shopper(n))}@example.com" if loyalty else f"voucher-{n}",
            currency=currency,
            expiring_date=expires,
            multiple_credits=loyalty,
            multiple_redemptions=loyalty,
        )
    )
    card_id = str(issued.card.id)
    load = Decimal(rng.choice(CURRENCIES[currency]))
    await ledger.create_transaction(card_id, operation="Credit", value=load, description="load", request_id=f"load-{n}")
    counts["transactions"] += 1
    for order in range(rng.choice((0, 1, 1, 2, 3)) if loyalty else 1):
        spend = (load * Decimal(rng.randint(5, 45)) / 100).quantize(
            Decimal(1) if currency == "JPY" else Decimal("0.01")
        )
        if spend <= 0:
            continue
        debit = await ledger.create_transaction(
            card_id,
            operation="Debit",
            value=spend,
            description=f"order {n}-{order}",
            request_id=f"order-{n}-{order}",
            order_info={"orderId": f"{n:06d}-{order:02d}"},
        )
        counts["transactions"] += 1
        await follow_up(ledger, rng, card_id, debit.id, spend, currency, counts)


async def follow_up(
    ledger: Ledger, rng: random.Random, card_id: str, transaction_id: str, spend: Decimal, currency: str, counts: dict
) -> None:
    """Most orders settle, in one or two captures; some are partly or wholly cancelled."""
    quantum = Decimal(1) if currency == "JPY" else Decimal("0.01")
    fate = rng.random()
    if fate < 0.65:
        first = (spend * Decimal(rng.choice((50, 100))) / 100).quantize(quantum)
        await ledger.settle(card_id, transaction_id, value=first, request_id="s1")
        counts["settlements"] += 1
        if first < spend:
            await ledger.settle(card_id, transaction_id, value=spend - first, request_id="s2")
            counts["settlements"] += 1
    elif fate < 0.85:
        part = (spend / 2).quantize(quantum)
        if part > 0:
            await ledger.settle(card_id, transaction_id, value=part, request_id="s1")
            await ledger.cancel(card_id, transaction_id, value=spend - part, request_id="c1")
            counts["settlements"] += 1
            counts["cancellations"] += 1
    elif fate < 0.95:
        await ledger.cancel(card_id, transaction_id, value=spend, request_id="c1")
        counts["cancellations"] += 1
    # else: left authorized, as real orders sometimes are


def cards_per_shopper(n: int) -> int:
    """About three loyalty cards per shopper, so searching by client finds several."""
    return max(1, n // 3 + 1)


async def register_partner(pool: asyncpg.Pool, native_id: str, base_url: str, cipher: CredentialsCipher) -> bool:
    """This service's /native as an external provider; needs GIFTCARD_SECRET_KEY to seal credentials."""
    if not cipher.available:
        return False
    # The hub will call /native with a Provider Protocol pair of the partner's own.
    app_key, app_token = await auth.create_key(pool, auth.PROVIDER, auth.ROLES)
    registry = ProviderRegistry(EventStore(pool), cipher, native_id)
    await registry.put(
        ProviderSpec(id=PARTNER_ID, service_url=f"{base_url}/native", caption="Demo partner (this service's /native)"),
        Credentials(app_key, app_token),
        metadata={"actor": "giftcard demo"},
    )
    return True


async def has_demo_data(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("select exists (select 1 from card_lookup where relation_name like 'demo-%')"))
