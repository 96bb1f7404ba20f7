"""The progress bar of the long commands: on a terminal only, never in a container's log."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from tqdm import tqdm


@contextlib.asynccontextmanager
async def progress_bar(
    pool: asyncpg.Pool, what: str, count: Callable[[asyncpg.Pool], Awaitable[int]]
) -> AsyncIterator[tqdm]:
    """A tqdm bar on stderr when stderr is a terminal (its total counted only then); a no-op otherwise."""
    shown = sys.stderr.isatty()
    total = await count(pool) if shown else None
    with tqdm(total=total, desc=what, unit="event", file=sys.stderr, disable=not shown) as bar:
        yield bar
