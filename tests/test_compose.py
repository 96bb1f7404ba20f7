"""docker-compose.yml is a valid Compose file, and refuses to start without its secrets."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("neither 'docker compose' nor 'docker-compose' is installed (.ci/run installs Debian's docker-compose)")


def config(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GIFTCARD_", "POSTGRES_"))}
    return subprocess.run(
        [*compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config"],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_compose_file_is_valid_with_its_secrets_set():
    done = config({"POSTGRES_PASSWORD": "pw", "GIFTCARD_SECRET_KEY": "secret"})
    assert done.returncode == 0, done.stderr
    for service in ("postgres:", "hub:", "projections:", "healthcheck:", "pgdata:"):
        assert service in done.stdout


def test_compose_refuses_to_run_without_secrets():
    done = config({})
    assert done.returncode != 0 and "POSTGRES_PASSWORD" in done.stderr
