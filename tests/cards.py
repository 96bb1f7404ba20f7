"""Small builders shared by the tests."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal

from ledger.application.commands import IssueCard, IssuedCard, Ledger
from ledger.domain.giftcard import GiftCard, Operation


def issue_command(clock_now, **overrides) -> IssueCard:
    fields = dict(
        relation_name=f"rel-{uuid.uuid4().hex}",
        caption="Loyalty",
        profile_id="shopper@example.com",
        currency="USD",
        expiring_date=clock_now + timedelta(days=365),
    )
    fields.update(overrides)
    return IssueCard(**fields)


async def issue(ledger: Ledger, **overrides) -> IssuedCard:
    return await ledger.issue(issue_command(ledger.clock(), **overrides))


async def load_and_order(ledger: Ledger, card_id: str, order_id: str) -> tuple[Operation, Operation]:
    """The Credit of 100 ("load", for ``order_id``) and the Debit of 30.5 ("order") that the projection
    and audit tests build their cards' histories on."""
    credit = await ledger.create_transaction(
        card_id,
        operation="Credit",
        value=Decimal(100),
        description="load",
        request_id="load",
        order_info={"orderId": order_id},
    )
    debit = await ledger.create_transaction(
        card_id, operation="Debit", value=Decimal("30.5"), description="order", request_id="order"
    )
    return credit, debit


def issued_aggregate(now: datetime, **overrides) -> GiftCard:
    """A GiftCard aggregate issued at ``now``, no database: the domain tests, the fabricated audit
    ledgers and the projections benchmark name only the fields they care about; the rest are plain."""
    fields = dict(
        relation_name=f"rel-{uuid.uuid4().hex}",
        caption="Loyalty",
        profile_id="owner@example.com",
        currency="USD",
        emission_date=now,
        expiring_date=now + timedelta(days=30),
        restricted_to_owner=False,
        multiple_credits=True,
        multiple_redemptions=True,
        code_tail="WXYZ",
        issued_at=now,
    )
    fields.update(overrides)
    return GiftCard.issue(**fields)


async def count_events(pool) -> int:
    return await pool.fetchval("select count(*) from events")
