"""docker-compose.yml is a valid Compose file, and refuses to start without its secrets; migrations
run once as the schema's owner and the hub as the role ``db grant`` sets up; its profile ``ha``
(Patroni, docs/patroni.md) is valid too and points the hub at both nodes; the profile ``citus``
registers two workers with a coordinator and points its hub at the coordinator. The image installs
the lock file's pins, from a context that holds only what it copies, and has no ``giftcard bench``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"POSTGRES_PASSWORD": "pw", "GIFTCARD_SECRET_KEY": "secret", "GIFTCARD_APP_DB_PASSWORD": "app-pw"}


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
    done = config(SECRETS)
    assert done.returncode == 0, done.stderr
    for service in ("postgres:", "hub:", "projections:", "healthcheck:", "pgdata:"):
        assert service in done.stdout


def test_compose_refuses_to_run_without_secrets():
    done = config({})
    assert done.returncode != 0 and "POSTGRES_PASSWORD" in done.stderr


def test_default_services_leave_the_ha_and_citus_profiles_out():
    """``up`` without a profile starts only the single-PostgreSQL stack (Compose v1 lists every
    service in ``config``, v2 only the enabled ones: either way, what is listed says its profile)."""
    done = config(SECRETS)
    assert done.returncode == 0, done.stderr
    found = services(done)
    default = {"postgres", "migrate", "hub", "projections"}
    assert default <= set(found)
    for name, block in found.items():
        in_a_profile = re.search(r"^    profiles:\n    - (ha|citus|tools)$", block, re.M) is not None
        assert in_a_profile == (name not in default), (name, block)


def test_ha_profile_is_valid_and_the_hub_names_both_patroni_nodes():
    done = config(SECRETS, "ha")
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
    done = config(SECRETS, "citus")
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


def test_compose_refuses_to_run_without_the_service_roles_password():
    done = config({k: v for k, v in SECRETS.items() if k != "GIFTCARD_APP_DB_PASSWORD"})
    assert done.returncode != 0 and "GIFTCARD_APP_DB_PASSWORD" in done.stderr


def test_migrations_run_once_as_the_owner_and_the_service_as_the_granted_role():
    done = config(SECRETS)
    assert done.returncode == 0, done.stderr
    found = services(done)
    migrate = found["migrate"]
    assert "giftcard db upgrade && giftcard db grant giftcard_app" in " ".join(migrate.split()), migrate
    assert setting(migrate, "GIFTCARD_DATABASE_URL") == "postgresql://giftcard:pw@postgres:5432/giftcard"
    assert "GIFTCARD_SECRET_KEY" not in migrate and "GIFTCARD_APP_TOKEN" not in migrate, "it needs no secret"
    assert re.search(r"^    restart: .?no.?$", migrate, re.M), migrate
    for name in ("hub", "projections"):
        url = setting(found[name], "GIFTCARD_DATABASE_URL")
        assert url == "postgresql://giftcard_app:app-pw@postgres:5432/giftcard", (name, url)
        assert re.search(r"^      migrate:\n        condition: service_completed_successfully$", found[name], re.M)
    # The role the grant names is the one the postgres image creates on a new volume, with that password.
    postgres = found["postgres"]
    assert setting(postgres, "GIFTCARD_APP_DB_PASSWORD") == "app-pw"
    mount = re.search(r"(\S*create-app-role\.sh):/docker-entrypoint-initdb\.d/create-app-role\.sh:ro", postgres)
    assert mount, postgres
    script = (ROOT / "deploy/postgres/create-app-role.sh").read_text()
    assert "create role giftcard_app login password :'password';" in script
    assert 'password="$GIFTCARD_APP_DB_PASSWORD"' in script


def test_the_operators_tools_run_as_the_owner_and_every_service_names_the_default_tenant():
    """``docker-compose --profile tools run --rm admin tenants create ACCOUNT`` (README, Many stores):
    as the schema's owner, since removing a store deletes rows the service's role may not."""
    done = config({**SECRETS, "GIFTCARD_DEFAULT_TENANT": "acme"}, "tools")
    assert done.returncode == 0, done.stderr
    found = services(done)
    admin = found["admin"]
    assert setting(admin, "GIFTCARD_DATABASE_URL") == "postgresql://giftcard:pw@postgres:5432/giftcard"
    assert re.search(r"^    entrypoint:\n    - giftcard$", admin, re.M), admin
    assert re.search(r"^    restart: .?no.?$", admin, re.M), admin
    for name in ("hub", "projections", "admin"):
        assert setting(found[name], "GIFTCARD_DEFAULT_TENANT") == "acme", name


@pytest.mark.parametrize(
    ("profile", "job", "served"),
    [("ha", "migrate-ha", ("hub-ha", "projections-ha")), ("citus", "citus-setup", ("hub-citus",))],
)
def test_the_ha_and_citus_stacks_migrate_as_the_owner_and_serve_as_the_granted_role(profile, job, served):
    found = services(config(SECRETS, profile))
    steps = " ".join(found[job].split())
    assert (
        "giftcard db upgrade" in steps
        and "giftcard db grant giftcard_app --create-with-password-env GIFTCARD_APP_DB_PASSWORD" in steps
    )
    assert setting(found[job], "GIFTCARD_DATABASE_URL").startswith("postgresql://giftcard:pw@"), found[job]
    assert "GIFTCARD_SECRET_KEY" not in found[job], "a migration needs no secret key"
    for name in served:
        assert setting(found[name], "GIFTCARD_DATABASE_URL").startswith("postgresql://giftcard_app:app-pw@"), name
    assert re.search(rf"^      {job}:\n        condition: service_completed_successfully$", found[served[0]], re.M)


def test_the_projections_healthcheck_fails_when_projections_fall_behind():
    """``status --max-lag-s`` exits 1 past the bound (tests/test_projections.py runs it against a lag)."""
    done = config(SECRETS)
    assert done.returncode == 0, done.stderr
    check = re.search(r"^    healthcheck:\n(.*?)^    \S", services(done)["projections"], re.M | re.S).group(1)
    assert re.search(r"- projections\n\s+- status\n\s+- --max-lag-s\n\s+- '?60'?\n", check), check


# ---- the image -----------------------------------------------------------------------------------


def test_the_lock_pins_every_dependency_with_hashes_and_the_image_installs_it():
    locked = locked_versions((ROOT / "requirements.lock").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in locked, f"{name} is not in requirements.lock: run the command at its top"
        assert wanted.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} is not {wanted}"
    steps = " ".join((ROOT / "Dockerfile").read_text().split())
    install_lock = "pip install --no-cache-dir --require-hashes -r requirements.lock"
    install_project = "pip install --no-cache-dir --no-deps ."
    assert install_lock in steps and install_project in steps
    assert steps.index(install_lock) < steps.index(install_project), "the project's own install adds nothing"


def locked_versions(lock: str) -> dict[str, str]:
    """name -> version of every ``name==version`` entry, each of which must carry its hashes."""
    entries = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})*)", lock, re.M)
    for name, _, hashes in entries:
        assert hashes, f"{name} has no hash"
    assert len(entries) == lock.count("=="), "an entry is not name==version followed by its hashes"
    return {canonicalize_name(name): version for name, version, _ in entries}


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_more():
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*", "everything is left out unless named"
    admitted = {line[1:] for line in ignore if line.startswith("!")}
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= set(line.split()[1:-1])
    assert copied <= admitted, copied - admitted
    assert not admitted & {".env", ".git", ".venv", "tests", "bench", "docs"}


def test_without_bench_installed_the_cli_offers_no_bench_command():
    """As in the image, where bench/ is not copied: ``giftcard bench`` is an unknown command
    (exit 2, usage), not a ModuleNotFoundError's traceback."""
    no_bench = "import sys; sys.modules['bench'] = None; from hub.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", no_bench, "bench"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'bench'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    helped = subprocess.run([sys.executable, "-c", no_bench, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "bench" not in helped.stdout and "serve" in helped.stdout
