"""Run as a separate OS process by the projection tests: appends events to many streams, each in a
transaction held open for a random while after its insert, so that commits land in another order
than the inserts did and every source has writers waiting on it.

    python -m tests.append_worker URL PREFIX EVENTS
"""

from __future__ import annotations

import asyncio
import random
import sys

import asyncpg

from ledger.eventstore.codec import canonical_json
from ledger.eventstore.store import EventStore, NewEvent


async def append_events(url: str, prefix: str, events: int, *, streams: int, hold_s: float) -> None:
    pool = await asyncpg.create_pool(url, min_size=4, max_size=4)
    store = EventStore(pool)
    versions = dict.fromkeys((f"{prefix}-{n}" for n in range(streams)), 0)
    hashes: dict[str, bytes] = {}
    locks = {stream_id: asyncio.Lock() for stream_id in versions}
    rng = random.Random(prefix)

    async def one(n: int) -> None:
        stream_id = rng.choice(list(versions))
        async with locks[stream_id], pool.acquire() as connection, connection.transaction():
            event = NewEvent("Noted", canonical_json(f'{{"n": {n}}}'))
            hashes[stream_id] = await store.append(
                stream_id, versions[stream_id], [event], previous_hash=hashes.get(stream_id, b""), connection=connection
            )
            await asyncio.sleep(rng.uniform(0, hold_s))  # commits after inserts that came later
        versions[stream_id] += 1

    try:
        await asyncio.gather(*(one(n) for n in range(events)))
    finally:
        await pool.close()


if __name__ == "__main__":
    url, prefix, events = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(append_events(url, prefix, events, streams=40, hold_s=0.02))
