"""Brute-force protection for redemption codes, which no caller can turn against other shoppers.

A failed lookup counts against the pair (caller, shopper): the app key that made the call
(VTEX's hub, a store's back office) and the shopper's whole identity as sent (``client``'s id,
e-mail, document and corporate document together). Past ``shopper_failures_max`` failures in a
window the pair gets 429 with ``Retry-After`` until the window ends, even for a code that would
have matched: otherwise the limit would leak the right guess. Because the whole identity is the
key, naming a victim's e-mail makes a pair of one's own, not the victim's; and because the caller
is part of it, even a copy of the victim's whole identity blocks it only through that caller.

A caller is never refused as a whole: every shopper of a store arrives through the same one.
Past ``caller_failures_slow_after`` failures in a window, each further failure of that caller is
answered only after ``failure_delay_s`` (a right code still at once), which bounds what one
connection can guess and tells the operator, by a warning, that someone is trying.

A successful lookup is never delayed: the check is one primary-key read, and only failures are
written. Failures are counted in PostgreSQL, so the limits hold across every hub process. Each
subject is stored as a keyed hash: the table never holds a shopper's identity or a caller's key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field

import asyncpg
import msgspec

from hub.errors import ApiError
from ledger.domain.giftcard import Client

log = logging.getLogger(__name__)

SHOPPER_FAILURES_MAX = 10
CALLER_FAILURES_SLOW_AFTER = 100
FAILURE_DELAY_S = 1.0
WINDOW_S = 600
BLOCKED_REMEMBERED_MAX = 10_000


@dataclass(frozen=True)
class LookupSubjects:
    """The two counters a failed lookup adds to, as stored (keyed hashes, never the values)."""

    shopper: str
    caller: str

    def as_list(self) -> list[str]:
        return [self.shopper, self.caller]


@dataclass
class LookupThrottle:
    pool: asyncpg.Pool
    subject_key: bytes
    shopper_failures_max: int = SHOPPER_FAILURES_MAX
    caller_failures_slow_after: int = CALLER_FAILURES_SLOW_AFTER
    failure_delay_s: float = FAILURE_DELAY_S
    window_s: int = WINDOW_S
    blocked_until: dict[str, float] = field(default_factory=dict)
    pruned_bucket: int = -1

    def subjects(self, caller: str, client: Client) -> LookupSubjects:
        # A JSON array keeps the fields apart whatever they contain ("a", "bc" is not "ab", "c").
        pair = [caller, client.id, client.email, client.document, client.corporate_document]
        return LookupSubjects(shopper="shopper:" + self._keyed(pair), caller="caller:" + self._keyed([caller]))

    async def check(self, subjects: LookupSubjects) -> None:
        """Raises 429 while the (caller, shopper) pair is blocked; the caller alone never is."""
        now = time.time()
        if self.blocked_until.get(subjects.shopper, 0.0) <= now:
            bucket = self._bucket(now)
            failures = await self.pool.fetchval(
                "select failures from lookup_failures where subject = $1 and bucket = $2", subjects.shopper, bucket
            )
            self._block_if_over(subjects.shopper, failures or 0, bucket)
        wait_s = self.blocked_until.get(subjects.shopper, 0.0) - now
        if wait_s > 0:
            raise ApiError(
                429,
                "too_many_failed_lookups",
                "too many redemption codes that match no card for this shopper; wait before trying again",
                headers={"Retry-After": str(max(1, round(wait_s)))},
            )

    async def record_failure(self, subjects: LookupSubjects, caller: str) -> None:
        bucket = self._bucket(time.time())
        await self._forget_past_windows(bucket)
        rows = await self.pool.fetch(
            """
            insert into lookup_failures (subject, bucket, failures)
            select unnest($1::text[]), $2, 1
            on conflict (tenant_id, subject, bucket) do update set failures = lookup_failures.failures + 1
            returning subject, failures
            """,
            subjects.as_list(),
            bucket,
        )
        failures = {row["subject"]: row["failures"] for row in rows}
        self._block_if_over(subjects.shopper, failures[subjects.shopper], bucket)
        caller_failures = failures[subjects.caller]
        if caller_failures == self.caller_failures_slow_after + 1:  # once per window: the upsert counts one by one
            log.warning(
                "caller %s passed %d failed code lookups in this window; its failures now wait %g s",
                caller,
                self.caller_failures_slow_after,
                self.failure_delay_s,
            )
        if caller_failures > self.caller_failures_slow_after:
            await asyncio.sleep(self.failure_delay_s)

    def _block_if_over(self, shopper: str, failures: int, bucket: int) -> None:
        if failures >= self.shopper_failures_max:
            self.blocked_until[shopper] = (bucket + 1) * self.window_s
            if len(self.blocked_until) > BLOCKED_REMEMBERED_MAX:  # forget pairs whose windows are over
                now = time.time()
                self.blocked_until = {s: u for s, u in self.blocked_until.items() if u > now}

    async def _forget_past_windows(self, bucket: int) -> None:
        """Only the current window is ever read; without this, every guessed identity stays a row."""
        if bucket != self.pruned_bucket:
            self.pruned_bucket = bucket
            await self.pool.execute("delete from lookup_failures where bucket < $1", bucket)

    def _bucket(self, now: float) -> int:
        return int(now // self.window_s)

    def _keyed(self, values: list[str | None]) -> str:
        return hmac.new(self.subject_key, msgspec.json.encode(values), hashlib.sha256).hexdigest()
