"""docker-compose.yml is a valid Compose file, and refuses to start without its secrets; its
profile ``ha`` (Patroni, docs/patroni.md) is valid too and points the hub at both nodes; the profile
``citus`` registers two workers with a coordinator and points its hub at the coordinator."""

from __future__ import annotations

import os
import re
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


def config(env: dict[str, str], *profiles: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GIFTCARD_", "POSTGRES_", "PATRONI_"))}
    selected = [option for profile in profiles for option in ("--profile", profile)]
    return subprocess.run(
        [*compose_command(), "-f", str(ROOT / "docker-compose.yml"), *selected, "config"],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def services(done: subprocess.CompletedProcess) -> dict[str, str]:
    """Each service's block of ``config``'s normalised output, by name (no YAML parser needed)."""
    section = re.search(r"^services:\n(.*?)(?=^\S|\Z)", done.stdout, re.M | re.S).group(1)
    blocks = re.split(r"^  ([\w.-]+):\n", section, flags=re.M)[1:]
    return dict(zip(blocks[::2], blocks[1::2], strict=True))


def setting(block: str, name: str) -> str:
    return re.search(rf"^\s+{name}: (.*)$", block, re.M).group(1).strip("'\"")


def test_compose_file_is_valid_with_its_secrets_set():
    done = config({"POSTGRES_PASSWORD": "pw", "GIFTCARD_SECRET_KEY": "secret"})
    assert done.returncode == 0, done.stderr
    for service in ("postgres:", "hub:", "projections:", "healthcheck:", "pgdata:"):
        assert service in done.stdout


def test_compose_refuses_to_run_without_secrets():
    done = config({})
    assert done.returncode != 0 and "POSTGRES_PASSWORD" in done.stderr


def test_default_services_leave_the_ha_and_citus_profiles_out():
    """``up`` without a profile starts only the single-PostgreSQL stack (Compose v1 lists every
    service in ``config``, v2 only the enabled ones: either way, what is listed says its profile)."""
    done = config({"POSTGRES_PASSWORD": "pw", "GIFTCARD_SECRET_KEY": "secret"})
    assert done.returncode == 0, done.stderr
    found = services(done)
    default = {"postgres", "hub", "projections"}
    assert default <= set(found)
    for name, block in found.items():
        in_a_profile = re.search(r"^    profiles:\n    - (ha|citus)$", block, re.M) is not None
        assert in_a_profile == (name not in default), (name, block)


def test_ha_profile_is_valid_and_the_hub_names_both_patroni_nodes():
    done = config({"POSTGRES_PASSWORD": "pw", "GIFTCARD_SECRET_KEY": "secret"}, "ha")
    assert done.returncode == 0, done.stderr
    found = services(done)
    assert {"etcd", "patroni1", "patroni2", "hub-ha", "projections-ha"} <= set(found)
    for name in ("hub-ha", "projections-ha"):
        url = setting(found[name], "GIFTCARD_DATABASE_URL")
        assert "@patroni1:5432,patroni2:5432/giftcard" in url, url
        assert url.endswith("?target_session_attrs=read-write"), url
    for name in ("patroni1", "patroni2"):
        assert setting(found[name], "PATRONI_NAME") == name
        assert setting(found[name], "PATRONI_POSTGRESQL_CONNECT_ADDRESS") == f"{name}:5432"
        assert "etcd:2379" in setting(found[name], "PATRONI_ETCD3_HOSTS")
    assert setting(found["hub"], "GIFTCARD_DATABASE_URL").endswith("@postgres:5432/giftcard")


def test_citus_profile_registers_both_workers_and_the_hub_uses_the_coordinator():
    done = config({"POSTGRES_PASSWORD": "pw", "GIFTCARD_SECRET_KEY": "secret"}, "citus")
    assert done.returncode == 0, done.stderr
    found = services(done)
    assert {"citus-coordinator", "citus-worker1", "citus-worker2", "citus-setup", "hub-citus"} <= set(found)
    for name in ("citus-coordinator", "citus-worker1", "citus-worker2"):
        assert "image: citusdata/citus:" in found[name], found[name]
        assert "wal_level=logical" in found[name]  # shard moves need logical replication
    setup = found["citus-setup"]
    for step in (
        "add-worker citus-worker1 --coordinator-host citus-coordinator",
        "add-worker citus-worker2",
        "db upgrade",
    ):
        assert step in " ".join(setup.split()), setup
    for name in ("citus-setup", "hub-citus"):
        assert setting(found[name], "GIFTCARD_DATABASE_URL").endswith("@citus-coordinator:5432/giftcard")
    assert "service_completed_successfully" in found["hub-citus"]
