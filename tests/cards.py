"""Small builders shared by the tests."""

from __future__ import annotations

import uuid
from datetime import timedelta

from ledger.commands import IssueCard, IssuedCard, Ledger


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


async def count_events(pool) -> int:
    return await pool.fetchval("select count(*) from events")
