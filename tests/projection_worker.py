"""Run as a separate OS process by the projection tests: a projection runner over the real read
models plus a probe that writes down every event position it applies, each batch optionally
slowed (a sleep inside the batch transaction, after its writes) so that a kill lands mid-batch.

    python -m tests.projection_worker URL RUNNER_NAME --batch-events-max 20 --delay-s 0.05

Its connections carry RUNNER_NAME as their ``application_name``, so a test can find them.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import asyncpg

from ledger.eventstore.store import RecordedEvent
from projections import read_models
from projections.projection import Projection
from projections.runner import ProjectionRunner

PROBE = "probe"
PROBE_TABLE_SQL = (
    "create table projection_probe (position bigint not null, runner text not null)"  # no unique: duplicates must show
)


class Probe(Projection):
    """Records (position, runner) for every event it is given: the exactly-once evidence.

    Probes under other names share the table; a test then writes each probe's name as the runner.
    """

    tables = ("projection_probe",)

    def __init__(self, runner_name: str, name: str = PROBE) -> None:
        self.runner_name = runner_name
        self.name = name

    async def apply(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        await connection.executemany(
            "insert into projection_probe (position, runner) values ($1, $2)",
            [(event.position, self.runner_name) for event in events],
        )


class Slowed(Projection):
    """Another projection, sleeping inside its batch transaction once its writes are done."""

    def __init__(self, inner: Projection, delay_s: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.tables = inner.tables
        self.delay_s = delay_s

    async def apply(self, connection: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        await self.inner.apply(connection, events)
        await asyncio.sleep(self.delay_s)


async def main(url: str, runner_name: str, batch_events_max: int, delay_s: float, poll_interval_s: float) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2, server_settings={"application_name": runner_name})
    projections = [Slowed(p, delay_s) for p in [*read_models("VtexGiftCard"), Probe(runner_name)]]
    runner = ProjectionRunner(pool, projections, batch_events_max=batch_events_max, poll_interval_s=poll_interval_s)
    await runner.run_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("runner_name")
    parser.add_argument("--batch-events-max", type=int, default=20)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--poll-interval-s", type=float, default=0.02)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.runner_name, args.batch_events_max, args.delay_s, args.poll_interval_s))
