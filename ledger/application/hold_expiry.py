"""Hold expiry: authorizations never settled nor cancelled stop holding money after a while.

A Debit is an authorization; if its order is never settled nor cancelled, its funds
would stay held forever. With ``GIFTCARD_HOLD_TTL`` set, a sweeper finds Debits
still holding money past that age (in the transaction-history read model, which
may lag: it only proposes candidates) and asks the ledger to void each one. The
ledger decides on the card's fresh state and appends at most one ``Voided`` event
per transaction (version check plus a per-transaction key), so every hub process
may sweep at once and each hold is still voided exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import asyncpg

from ledger.application.commands import Ledger
from ledger.domain.errors import DomainError
from ledger.postgres.database import DATABASE_ERRORS
from ledger.postgres.tenancy import ALL_TENANTS, tenant_scope

log = logging.getLogger(__name__)

SWEEP_BATCH_MAX = 500

_EXPIRED_HOLDS = """
select tenant_id, card_id, transaction_id from read_transactions
where source = 'ledger' and operation = 'Debit' and value > settled + coalesce(released, 0)
  and provider = $1 and date <= $2
order by date
limit $3
"""


async def sweep_once(pool: asyncpg.Pool, ledger: Ledger, hold_ttl: timedelta, native_provider_id: str) -> int:
    """Voids every expired hold the read model knows of, in every store; returns how many this call voided."""
    cutoff = ledger.clock() - hold_ttl
    with tenant_scope(ALL_TENANTS):
        candidates = await pool.fetch(_EXPIRED_HOLDS, native_provider_id, cutoff, SWEEP_BATCH_MAX)
    voided = 0
    for row in candidates:
        try:
            with tenant_scope(row["tenant_id"]):  # the void is the card's store's event
                operation = await ledger.void_expired_hold(
                    row["card_id"], row["transaction_id"], hold_ttl=hold_ttl, metadata={"actor": "hold-expiry"}
                )
        except DomainError as e:
            log.warning("hold of %s/%s not voided: %s", row["card_id"], row["transaction_id"], e.message)
            continue
        voided += operation is not None
    return voided


async def run_hold_expiry(
    pool: asyncpg.Pool, ledger: Ledger, hold_ttl: timedelta, native_provider_id: str, interval_s: float
) -> None:
    while True:
        try:
            voided = await sweep_once(pool, ledger, hold_ttl, native_provider_id)
            if voided:
                log.info("voided %d expired holds", voided)
        except DATABASE_ERRORS:
            log.warning("hold-expiry sweep failed; trying again in %.0f s", interval_s, exc_info=True)
        await asyncio.sleep(interval_s)
