"""Run as a separate OS process by the concurrency tests: fires concurrent Debits of 1 at one
card through its own Ledger and connection pool, and prints how many succeeded."""

import asyncio
import sys
from decimal import Decimal

from ledger.application.commands import Ledger
from ledger.domain.errors import InsufficientFunds
from ledger.eventstore.store import EventStore
from ledger.postgres.database import create_pool


async def main(url: str, card_id: str, count: int, tag: str) -> None:
    pool = await create_pool(url, size_min=4, size_max=8)
    ledger = Ledger(EventStore(pool), code_key=b"k" * 32)

    async def one(i: int) -> bool:
        try:
            await ledger.create_transaction(
                card_id, operation="Debit", value=Decimal(1), description="race", request_id=f"{tag}-{i}"
            )
            return True
        except InsufficientFunds:
            return False

    results = await asyncio.gather(*(one(i) for i in range(count)))
    await pool.close()
    print(sum(results))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
