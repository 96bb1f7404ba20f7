"""Brute-force protection for redemption codes: failed lookups are limited per shopper and
per calling address, so guessing codes at scale is impractical.

A successful lookup is never delayed: the check is one primary-key read, and only
failures are written. Failures are counted in PostgreSQL, so the limit holds
across every hub process. A blocked subject gets 429 with ``Retry-After`` until
its window ends, even for a code that would have matched: otherwise the limit
would leak the right guess.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import asyncpg

from hub.errors import ApiError

CLIENT_FAILURES_MAX = 10
ADDRESS_FAILURES_MAX = 100
WINDOW_S = 600


@dataclass
class LookupThrottle:
    pool: asyncpg.Pool
    client_failures_max: int = CLIENT_FAILURES_MAX
    address_failures_max: int = ADDRESS_FAILURES_MAX
    window_s: int = WINDOW_S
    blocked_until: dict[str, float] = field(default_factory=dict)

    async def check(self, subjects: list[str]) -> None:
        now = time.time()
        if not any(self.blocked_until.get(s, 0.0) > now for s in subjects):
            bucket = int(now // self.window_s)
            rows = await self.pool.fetch(
                "select subject, failures from lookup_failures where subject = any($1::text[]) and bucket = $2",
                subjects,
                bucket,
            )
            self._block_over_limit(rows, bucket)
        waits = [until - now for s in subjects if (until := self.blocked_until.get(s, 0.0)) > now]
        if waits:
            raise ApiError(
                429,
                "too_many_failed_lookups",
                "too many redemption codes that match no card; wait before trying again",
                headers={"Retry-After": str(max(1, round(max(waits))))},
            )

    async def record_failure(self, subjects: list[str]) -> None:
        bucket = int(time.time() // self.window_s)
        rows = await self.pool.fetch(
            """
            insert into lookup_failures (subject, bucket, failures)
            select unnest($1::text[]), $2, 1
            on conflict (subject, bucket) do update set failures = lookup_failures.failures + 1
            returning subject, failures
            """,
            subjects,
            bucket,
        )
        self._block_over_limit(rows, bucket)
        if len(self.blocked_until) > 10_000:  # forget subjects whose windows are over
            now = time.time()
            self.blocked_until = {s: u for s, u in self.blocked_until.items() if u > now}

    def _block_over_limit(self, rows: list[asyncpg.Record], bucket: int) -> None:
        window_end = (bucket + 1) * self.window_s
        for row in rows:
            if row["failures"] >= self.limit_for(row["subject"]):
                self.blocked_until[row["subject"]] = window_end

    def limit_for(self, subject: str) -> int:
        return self.address_failures_max if subject.startswith("address:") else self.client_failures_max


def lookup_subjects(client_identifiers: set[str], address: str | None) -> list[str]:
    subjects = [f"client:{identifier}" for identifier in sorted(client_identifiers)]
    subjects.append(f"address:{address or 'unknown'}")
    return subjects
