"""The real ``giftcard`` command line (``python -m hub.cli``) as a subprocess, with only the
``GIFTCARD_*`` settings a test gives it (none inherited from the shell running the tests)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.subprocesses import output_within

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 120.0
NATIVE = "VtexGiftCard"


async def giftcard(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("GIFTCARD_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub.cli",
        *args,
        cwd=ROOT,
        env={**inherited, "GIFTCARD_NATIVE_PROVIDER_ID": NATIVE, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await output_within(process, CLI_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()
