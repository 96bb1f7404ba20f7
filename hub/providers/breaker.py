"""A circuit breaker per external provider, so one dead provider does not slow the others.

Closed: calls go through. After ``failures_max`` consecutive failures it opens:
calls fail at once for ``open_s``. Then it is half-open: one trial call goes
through; success closes it, failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

FAILURES_MAX = 5
OPEN_S = 5.0


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self, *, failures_max: int = FAILURES_MAX, open_s: float = OPEN_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures_max = failures_max
        self.open_s = open_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at < self.open_s:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def allow(self) -> bool:
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.trial_in_flight = False

    def record_failure(self) -> None:
        self.failures += 1
        self.trial_in_flight = False
        if self.opened_at is not None or self.failures >= self.failures_max:
            self.opened_at = self.clock()

    def retry_after_s(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.open_s - (self.clock() - self.opened_at))
