"""Child processes that tests start and wait on."""

from __future__ import annotations

import asyncio


async def output_within(process: asyncio.subprocess.Process, timeout_s: float) -> tuple[bytes, bytes]:
    """The process's (stdout, stderr) once it exits. One that outlasts ``timeout_s`` is killed and
    reaped before the TimeoutError propagates, so a hung child never outlives its test."""
    try:
        return await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
