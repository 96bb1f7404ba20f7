"""Debit authorizations over HTTP: our service beside a conventional and a lean design, driven by wrk.

Three (or four) servers answer ``POST /native/giftcards/{id}/transactions`` with a Debit body:

ours           ``giftcard serve``, as shipped (event store, hash chain, snapshots, access log);
ours-hub       the same server, but the Debits go through the hub, to
               ``/api/giftcardproviders/VtexGiftCard/giftcards/{id}/transactions`` with the hub-consumer
               headers: the hub's forwarding overhead, reported as a share of ours' throughput;
ours-w2        the same with ``--workers 2``, measured only when ``giftcard serve`` offers it;
ours-rls       ours run as the database role ``giftcard db grant`` sets up, one store: what
               row-level security costs (issue 23), reported as ours-rls / ours;
ours-100t      the same role, the 1,000 cards spread round-robin over 100 stores (tenants), each
               Debit sent with its card's store's keys: issue 23's "100 tenants", as ours-100t / ours;
ours-plain     ours with shoppers' personal data stored unsealed (``bench.unsealed_serve``, a
               bench-only wrapper): what sealing costs (issue 24), reported as ours / ours-plain;
conventional   ``bench.baselines.eventsourcing_app``: the eventsourcing library's stock
               PostgreSQL application behind aiohttp, on a thread pool;
lean           ``bench.baselines.lean_update_app``: one guarded UPDATE and one idempotency row
               per Debit, no history.

Every Debit is the body VTEX's checkout sends (``../shared/bench/debit-body.json``: the card's
redemption code, a unique requestId, an orderInfo with cart, shopper and shipping), which every
contender parses whole; every server runs on uvloop. Our servers run as shipped: projections on,
and a webhook subscription delivering every Debit to a sink on loopback (``bench.webhook_sink``).

Each server runs alone, as a subprocess on 127.0.0.1, against a fresh database of its own on the
same PostgreSQL server, with 1,000 cards it created and credited itself. ``--tenants N`` spreads
ours' cards (and ours-hub's, ours-w2's, ours-plain's) over N stores the same way, N > 1 as the
service's role; each store of ours with webhooks has its own subscription. wrk then sends Debits of
0.01 to those cards round-robin, each with a unique requestId and the card's redemptionCode (as
VTEX's checkout sends it, so ours checks it on every Debit; the baselines ignore it), at each connection count: a short
warm-up, then a measured run. The whole sequence is repeated ``--rounds`` times, the servers taking
turns, and each row reports the server's median round, because a shared two-core machine makes
any single round unreliable. Beside wrk's figures, /proc tells how many cores the server,
PostgreSQL and the whole machine used, so a CPU-bound server and a disturbed cell show
themselves, and the sink's count how many webhooks our server delivered per Debit during the cell
(under 1: its deliverer fell behind, and part of the cost of its webhooks came after the cell). Servers are stopped at the end, also on error or Ctrl-C.

    python -m bench.http_debits --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from bench import event_store_appends
from bench.arguments import int_list
from bench.report import write_json
from bench.webhook_sink import running_sink
from hub.http import auth
from ledger.postgres.database import create_pool, database_named
from ledger.postgres.migrate import grant_service_role, upgrade
from ledger.postgres.tenancy import ALL_TENANTS, tenant_scope

CARDS = 1_000
CARD_CREDIT = "1000000.00"  # a million of the checkout body's 1.00 Debits per card: no run comes near it
CHECKOUT_BODY = Path(__file__).resolve().parents[2] / "shared" / "bench" / "debit-body.json"  # beside the checkout
CONNECTIONS = (16, 64)
HOST = "127.0.0.1"  # every request of the benchmark stays on this machine
DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SEED_CONCURRENCY = 16
READY_TIMEOUT_S = 60.0
SEED_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 15.0
WRK_TIMEOUT_S = 5  # a request slower than this counts as a wrk timeout error
TARGET_VS_CONVENTIONAL = 5.0  # the project's targets, checked at the highest connection count
TARGET_P99_MS = 50.0
TARGET_HUB_VS_DIRECT = 0.85  # the hub path keeps at least this share of the direct /native throughput
TARGET_COST_RATIO = 0.95  # issues 23 and 24: many stores, and sealing personal data, each cost at most 5 %
MANY_STORES = 100  # ours-100t's stores
NATIVE_PROVIDER_ID = "VtexGiftCard"  # set explicitly for ours-hub, whatever the caller's environment says

OURS, OURS_HUB, OURS_W2, CONVENTIONAL, LEAN = "ours", "ours-hub", "ours-w2", "conventional", "lean"
OURS_RLS, OURS_100T, OURS_PLAIN = "ours-rls", "ours-100t", "ours-plain"
OUR_SERVERS = (OURS, OURS_HUB, OURS_W2, OURS_RLS, OURS_100T, OURS_PLAIN)


@dataclass(frozen=True)
class Timing:
    warmup: float
    seconds: float


@dataclass(frozen=True)
class Credentials:
    """One store's pairs: the Provider Protocol's and the hub consumer's."""

    key: str
    token: str
    hub_key: str
    hub_token: str

    @classmethod
    def generated(cls) -> Credentials:
        """The pairs service_env configures (the default store's): the hub's is a different key, so
        the wrong audience's headers would be refused rather than silently accepted."""
        key, token = "bench-" + secrets.token_hex(4), secrets.token_urlsafe(24)
        return cls(key, token, key + "-hub", token)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-PROVIDER-API-AppKey": self.key, "X-PROVIDER-API-AppToken": self.token}

    @property
    def hub_headers(self) -> dict[str, str]:
        return {"X-VTEX-API-AppKey": self.hub_key, "X-VTEX-API-AppToken": self.hub_token}


@dataclass(frozen=True)
class Role:
    """The database role ``giftcard db grant`` sets up, made for this run: row-level security holds it."""

    name: str
    password: str

    @classmethod
    def generated(cls) -> Role:
        return cls(f"giftcard_bench_{secrets.token_hex(4)}", secrets.token_urlsafe(18))

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, f"{self.name}:{self.password}@{host}", *parts[2:]))


@dataclass(frozen=True)
class Route:
    """Where wrk posts a card's Debits, and as whom."""

    transactions: Callable[[str], str]  # card id -> path
    headers: Callable[[Credentials], dict[str, str]]


DIRECT = Route(lambda card: f"/native/giftcards/{card}/transactions", lambda c: c.headers)
VIA_HUB = Route(
    lambda card: f"/api/giftcardproviders/{NATIVE_PROVIDER_ID}/giftcards/{card}/transactions", lambda c: c.hub_headers
)


@dataclass
class Cell:
    """One server at one connection count: what wrk measured."""

    server: str
    connections: int
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    round: int = 0
    rounds_requests_per_s: list[float] = field(default_factory=list)  # this cell's req/s in every round
    busy_cores_before: float = 0.0  # the machine's load in the second before the cell
    cpu: dict[str, float] = field(default_factory=dict)  # cores used during the cell, by whom
    server_cpu_ms_per_request: float = 0.0  # the server's CPU per answered request: its efficiency
    vs_conventional: float | None = None
    vs_lean: float | None = None
    hub_vs_direct: float | None = None  # ours-hub only: its req/s over ours' at the same connection count
    stores: int = 1  # the stores (tenants) its cards were spread over
    # Webhook deliveries the sink received during the cell, per Debit answered: about 1 when the
    # deliverer keeps up; less, and the cell left part of its webhooks' cost for after it.
    webhooks_per_debit: float | None = None


@dataclass(frozen=True)
class Server:
    """How to start one contender and create its cards."""

    name: str
    database: str
    command: Callable[[int, str], list[str]]  # (port, database url) -> argv
    # (base url, each store's credentials) -> each card's id, redemption code ("" where the server
    # has none) and store (its index in the credentials)
    seed: Callable[[str, list[Credentials]], Awaitable[list[Card]]]
    env: dict[str, str] = field(default_factory=dict)
    route: Route = DIRECT
    stores: int = 1  # over how many stores (tenants) the cards are spread
    # Run as the service's role (``Role``): row-level security holds it, as deployed. Without it
    # (the bench's own role, a superuser) only the default store is served, so stores > 1 need it.
    isolated: bool = False


class Card(NamedTuple):
    id: str
    code: str
    store: int  # index into the stores' credentials


# ---- the servers --------------------------------------------------------------------------------


def giftcard_command() -> list[str]:
    """The ``giftcard`` script of this virtualenv (the one running the benchmark)."""
    script = Path(sys.executable).parent / "giftcard"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hub.cli"]


def serve_supports_workers() -> bool:
    """Asked at run time: the ``--workers`` option may or may not exist in this checkout."""
    help_text = subprocess.run(
        [*giftcard_command(), "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    return "--workers" in help_text


def ours(
    name: str,
    database: str,
    credentials: Credentials,
    extra_env: list[str],
    workers: int | None = None,
    route: Route = DIRECT,
    stores: int = 1,
    isolated: bool = False,
    program: list[str] | None = None,
) -> Server:
    """``program``: the ``giftcard`` command line to run (default this virtualenv's)."""

    def command(port: int, url: str) -> list[str]:
        argv = [*(program or giftcard_command()), "serve", "--host", HOST, "--port", str(port)]
        return argv + ["--workers", str(workers)] if workers else argv

    # The webhook sink is on loopback, which the egress policy refuses unless allowed.
    # A subscription's signing secret is stored encrypted, under GIFTCARD_SECRET_KEY.
    env = {
        "GIFTCARD_PROVIDER_ALLOWLIST": "127.0.0.0/8",
        "GIFTCARD_SECRET_KEY": credentials.token + "-secret",
        **service_env(credentials, extra_env),
    }
    if route is VIA_HUB:
        env["GIFTCARD_NATIVE_PROVIDER_ID"] = NATIVE_PROVIDER_ID  # the id the hub path names
    return Server(
        name, database, command, seed_ours, env=env, route=route, stores=stores, isolated=isolated or stores > 1
    )


def service_env(credentials: Credentials, extra: list[str] | None = None) -> dict[str, str]:
    # Both audiences configured: otherwise the service would generate and print a pair.
    return {
        "GIFTCARD_PROVIDER_APP_KEY": credentials.key,
        "GIFTCARD_PROVIDER_APP_TOKEN": credentials.token,
        "GIFTCARD_APP_KEY": credentials.hub_key,
        "GIFTCARD_APP_TOKEN": credentials.hub_token,
        **dict(item.split("=", 1) for item in extra or []),
    }


def baseline(name: str, module: str, database: str, credentials: Credentials) -> Server:
    def command(port: int, url: str) -> list[str]:
        return [sys.executable, "-m", module, "--port", str(port), "--database-url", url]

    return Server(name, database, command, seed_baseline, env=service_env(credentials))


def contenders(args: argparse.Namespace, credentials: Credentials) -> list[Server]:
    prefix, stores = args.bench_database, args.tenants
    servers = [ours(OURS, prefix, credentials, args.ours_env, stores=stores)]
    # Right after ours in every round, so each ratio to ours compares runs as close together as possible.
    servers.append(ours(OURS_HUB, f"{prefix}_hub", credentials, args.ours_env, route=VIA_HUB, stores=stores))
    servers.append(ours(OURS_RLS, f"{prefix}_rls", credentials, args.ours_env, isolated=True))
    servers.append(ours(OURS_100T, f"{prefix}_100t", credentials, args.ours_env, stores=MANY_STORES))
    unsealed = [sys.executable, "-m", "bench.unsealed_serve"]
    servers.append(ours(OURS_PLAIN, f"{prefix}_plain", credentials, args.ours_env, stores=stores, program=unsealed))
    if args.workers_variant:
        servers.append(ours(OURS_W2, f"{prefix}_w2", credentials, args.ours_env, workers=2, stores=stores))
    servers.append(baseline(CONVENTIONAL, "bench.baselines.eventsourcing_app", f"{prefix}_es", credentials))
    servers.append(baseline(LEAN, "bench.baselines.lean_update_app", f"{prefix}_lean", credentials))
    return [s for s in servers if s.name in args.servers]


# ---- seeding: every server creates and credits its own cards ----------------------------------


async def seed_ours(base_url: str, stores: list[Credentials]) -> list[Card]:
    """1,000 cards through the service's own Provider Protocol, round-robin over the stores, each
    with its store's keys: create, then one Credit each."""
    async with aiohttp.ClientSession(base_url) as session:
        limit = asyncio.Semaphore(SEED_CONCURRENCY)

        async def post(path: str, body: dict[str, Any], credentials: Credentials) -> dict[str, Any]:
            async with limit, session.post(path, json=body, headers=credentials.headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"seeding: POST {path} answered {response.status}: {await response.text()}")
                return await response.json()

        async def card(i: int) -> Card:
            store = i % len(stores)
            created = await post(
                "/native/giftcards",
                {"relationName": f"bench-{i}", "caption": "bench", "profileId": f"bench-{i}@example.com"},
                stores[store],
            )
            credit = {"operation": "Credit", "value": float(CARD_CREDIT), "description": "seed", "requestId": "seed"}
            await post(f"/native/giftcards/{created['id']}/transactions", credit, stores[store])
            return Card(created["id"], created["redemptionCode"], store)

        return list(await asyncio.gather(*(card(i) for i in range(CARDS))))


async def subscribe(base_url: str, stores: list[Credentials], url: str) -> None:
    """Our service as shipped delivers webhooks: each store subscribes to every Debit of its own, to the bench's sink."""
    async with aiohttp.ClientSession(base_url) as session:
        for credentials in stores:
            body = {"url": url, "events": ["card.debited"]}
            async with session.post("/api/webhooks", json=body, headers=credentials.hub_headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"subscribing: answered {response.status}: {await response.text()}")


async def seed_baseline(base_url: str, stores: list[Credentials]) -> list[Card]:
    """The baselines create and credit their cards in-process, behind one seed route (one store)."""
    async with aiohttp.ClientSession(base_url, headers=stores[0].headers) as session:
        body = {"cards": CARDS, "value": float(CARD_CREDIT)}
        async with session.post("/bench/seed", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"seeding: answered {response.status}: {await response.text()}")
            return [Card(card_id, "", 0) for card_id in (await response.json())["ids"]]


# ---- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def running(server: Server, url: str, log_dir: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """The server as a subprocess until the block ends, however it ends.

    It gets a session (process group) of its own, so that stopping it also stops any worker
    processes it forked; its output goes to a file, never to a pipe nobody drains.
    """
    port = free_port()
    log_path = log_dir / f"{server.name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            server.command(port, url),
            env={**os.environ, **server.env, "GIFTCARD_DATABASE_URL": url},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,  # so ``python -m bench.baselines.*`` resolves
        )
        try:
            base_url = f"http://{HOST}:{port}"
            asyncio.run(wait_ready(process, base_url, log_path))
            yield process, base_url
        finally:
            stop(process)


async def wait_ready(process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession(base_url, timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{tail(log_path)}")
            try:
                async with session.get("/healthz") as response:
                    if response.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{tail(log_path)}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---- databases ---------------------------------------------------------------------------------


async def admin_execute(server_url: str, *statements: str) -> None:
    connection = await asyncpg.connect(server_url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def recreate_database(server_url: str, name: str) -> str:
    asyncio.run(admin_execute(server_url, f"drop database if exists {name} with (force)", f"create database {name}"))
    return database_named(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    asyncio.run(admin_execute(server_url, f"drop database if exists {name} with (force)"))


def prepare_stores(url: str, server: Server, credentials: Credentials, role: Role) -> tuple[list[Credentials], str]:
    """Each store's credentials, and the URL the server runs with. One store of the bench's own role:
    the environment's pairs, and the database as it is (the server brings its schema current).
    Otherwise, as the schema's owner: the schema, the service's role granted on it (``giftcard db
    grant``), and stores ``bench-000``... with their pairs (``giftcard keys create --tenant``)."""
    if not server.isolated:
        return [credentials], url
    return asyncio.run(_created_stores(url, server.stores, role)), role.url(url)


async def _created_stores(url: str, count: int, role: Role) -> list[Credentials]:
    pool = await create_pool(url, size_min=1, size_max=2)
    try:
        with tenant_scope(ALL_TENANTS):
            async with pool.acquire() as connection:
                await upgrade(connection)
                await grant_service_role(connection, role.name)
            stores = []
            for number in range(count):
                tenant = f"bench-{number:03d}"
                provider = await auth.create_key(pool, auth.PROVIDER, auth.ROLES, tenant)
                hub = await auth.create_key(pool, auth.HUB, auth.ROLES, tenant)
                stores.append(Credentials(*provider, *hub))
            return stores
    finally:
        await pool.close()


@contextmanager
def service_role(server_url: str, role: Role, needed: bool) -> Iterator[None]:
    """``role`` as a login role of the server (roles are the cluster's, not a database's) while the
    block runs, when ``needed``."""
    if not needed:
        yield
        return
    asyncio.run(admin_execute(server_url, f"create role {role.name} login password '{role.password}'"))
    try:
        yield
    finally:
        # Its grants went with the bench's databases; one left over by a killed run keeps it.
        with suppress(asyncpg.PostgresError):
            asyncio.run(admin_execute(server_url, f"drop role if exists {role.name}"))


def checkpoint(server_url: str) -> None:
    """Flush dirty pages before each cell, so no cell pays for the previous cell's writes."""
    with suppress(asyncpg.InsufficientPrivilegeError):
        asyncio.run(admin_execute(server_url, "checkpoint"))


def server_facts(server_url: str) -> dict[str, str]:
    return asyncio.run(event_store_appends.server_facts(server_url))


# ---- CPU accounting: who used the cores during a cell ------------------------------------------
#
# The machine is small and may be shared: a cell's figures mean little without knowing whether the
# server was CPU-bound, and whether something else was running. Read straight from /proc (Linux).

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    at: float
    machine_busy: float  # seconds of all cores not idle since boot
    server: dict[int, float]  # pid -> CPU seconds, for the server's process group
    postgres: dict[int, float]  # pid -> CPU seconds, for the PostgreSQL processes serving the benchmark's database


def process_times() -> Iterator[tuple[int, int, int, Path, float]]:
    """(pid, process group, uid, /proc entry, CPU seconds) for every process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            uid = entry.stat().st_uid
        except OSError:  # the process ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        yield int(entry.name), int(fields[2]), uid, entry, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def serves_database(entry: Path, database: str) -> bool:
    """A PostgreSQL process working for this benchmark: a backend of its database, or one of the
    server's own background processes (WAL writer, checkpointer...), not another client's backend."""
    try:
        title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return f" {database} " in title or not re.search(r"\(\d+\)|\[local\]", title)


def machine_busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def cpu_sample(server_pgid: int, postgres_uid: int | None, database: str) -> CpuSample:
    server: dict[int, float] = {}
    postgres: dict[int, float] = {}
    for pid, pgid, uid, entry, seconds in process_times():
        if pgid == server_pgid:
            server[pid] = seconds
        elif uid == postgres_uid and serves_database(entry, database):
            postgres[pid] = seconds
    return CpuSample(time.monotonic(), machine_busy_seconds(), server, postgres)


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two samples by the processes alive at the second one (a process started
    in between counts in full; one that ended in between is lost, which is rare here)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def cpu_use(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Cores used on average over the interval (1.0 = one core busy all the time)."""
    wall = after.at - before.at
    return {
        "machine_cores": round((after.machine_busy - before.machine_busy) / wall, 2),
        "server_cores": round(cpu_delta(before.server, after.server) / wall, 2),
        "postgres_cores": round(cpu_delta(before.postgres, after.postgres) / wall, 2),
    }


def wait_until_quiet(limit_s: float, busy_max: float = 0.25) -> float:
    """Waits (at most ``limit_s``) for a second in which the cores are mostly idle; returns that
    second's busy cores, so a cell started on a busy machine is at least known as such."""
    deadline = time.monotonic() + limit_s
    while True:
        before = machine_busy_seconds()
        time.sleep(1.0)
        busy = machine_busy_seconds() - before
        if busy <= busy_max or time.monotonic() >= deadline:
            return round(busy, 2)


def postgres_uid() -> int | None:
    try:
        import pwd

        return pwd.getpwnam("postgres").pw_uid
    except (ImportError, KeyError):
        return None


# ---- wrk ------------------------------------------------------------------------------------------

# Each wrk thread has its own Lua state: ``setup`` (main state) hands each one its number, and a
# request's card and requestId come from (thread, counter), so no two requests share a requestId
# and consecutive requests go to different cards. A card names its store, whose headers (keys)
# go with its Debits: one table per store, built once. ``done`` prints the figures as one JSON line.
LUA_TEMPLATE = r"""
-- generated by bench/http_debits.py
local stores = {
%(stores)s
}
local cards = {
%(cards)s
}
local n = #cards
-- The checkout's Debit body around its two blanks: the card's code, then a fresh requestId.
local body_head = %(body_head)s
local body_middle = %(body_middle)s
local body_tail = %(body_tail)s
wrk.method = "POST"

local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end

function init(args)
  prefix = args[1]
  nthreads = tonumber(args[2])
  counter = 0
end

function request()
  counter = counter + 1
  local card = cards[((counter * nthreads + tid) %% n) + 1]
  local body = body_head .. card[2] .. body_middle .. prefix .. "-" .. tid .. "-" .. counter .. body_tail
  return wrk.format(nil, "%(path_head)s" .. card[1] .. "%(path_tail)s", stores[card[3]], body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%%.0f,"duration_us":%%.0f,"p50_us":%%.0f,"p90_us":%%.0f,"p99_us":%%.0f,' ..
    '"max_us":%%.0f,"status_errors":%%.0f,"connect_errors":%%.0f,"read_errors":%%.0f,' ..
    '"write_errors":%%.0f,"timeouts":%%.0f}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
"""


def write_lua_script(
    directory: Path, cards: list[Card], stores: list[Credentials], route: Route, body: CheckoutBody
) -> Path:
    path = directory / "debits.lua"
    rows = ",\n".join(f'{{"{card.id}", "{card.code}", {card.store + 1}}}' for card in cards)  # Lua counts from 1
    # wrk.format takes a request's headers whole (only Host is added): the content type goes in each table.
    headers = [{**route.headers(credentials), "Content-Type": "application/json"} for credentials in stores]
    tables = ",\n".join("{" + ", ".join(f'["{k}"] = "{v}"' for k, v in h.items()) + "}" for h in headers)
    # The route as the text around a placeholder id, so the Lua side only concatenates.
    path_head, path_tail = route.transactions("\0").split("\0")
    head, middle, tail = (lua_string(part) for part in body.parts)
    path.write_text(
        LUA_TEMPLATE
        % {
            "stores": tables,
            "cards": rows,
            "path_head": path_head,
            "path_tail": path_tail,
            "body_head": head,
            "body_middle": middle,
            "body_tail": tail,
        }
    )
    return path


def lua_string(text: str) -> str:
    # A Lua long bracket takes the JSON as it is (quotes and backslashes included); the level is
    # chosen so that no closing bracket of that level occurs inside.
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


@dataclass(frozen=True)
class CheckoutBody:
    """The Debit VTEX's checkout sends (../shared/bench/debit-body.json), compacted as a client
    sends it, split around its two blanks: ``{{redemptionCode}}`` and ``{{requestId}}``."""

    parts: tuple[str, str, str]
    value: str  # the Debit's amount, as the body carries it

    @classmethod
    def read(cls, path: Path) -> CheckoutBody:
        if not path.is_file():
            raise SystemExit(
                f"the checkout's Debit body is not at {path}: pass --body FILE (see ../shared/bench/README.md)"
            )
        template = json.loads(path.read_text())
        text = json.dumps(template, separators=(",", ":"), ensure_ascii=False)
        code, request_id = "{{redemptionCode}}", "{{requestId}}"
        if not 0 <= text.find(code) < text.find(request_id):
            raise SystemExit(f"{path}: the body must hold {code} and then {request_id}")
        head, rest = text.split(code)
        middle, tail = rest.split(request_id)
        return cls((head, middle, tail), str(template["value"]))


def run_wrk(base_url: str, script: Path, connections: int, seconds: float, tag: str, threads: int) -> dict[str, float]:
    threads = min(threads, connections)
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        f"--timeout={WRK_TIMEOUT_S}s", "-s", str(script), base_url, "--", tag, str(threads),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    match = re.search(r"^BENCH_RESULT (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(match.group(1))


def cell_of(server: str, connections: int, figures: dict[str, float]) -> Cell:
    seconds = figures["duration_us"] / 1e6
    return Cell(
        server=server,
        connections=connections,
        requests=int(figures["requests"]),
        seconds=round(seconds, 3),
        requests_per_s=figures["requests"] / seconds,
        p50_ms=figures["p50_us"] / 1000,
        p90_ms=figures["p90_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
        non_2xx=int(figures["status_errors"]),
        socket_errors=int(sum(figures[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))),
    )


# ---- one server, every connection count ----------------------------------------------------------


def measure_server(
    server: Server, server_url: str, args: argparse.Namespace, work: Path, credentials: Credentials, *, profile: bool
) -> list[Cell]:
    url = recreate_database(server_url, server.database)
    try:
        stores, serve_url = prepare_stores(url, server, credentials, args.role)
        with running(server, serve_url, work) as (process, base_url):
            started = time.monotonic()
            cards = asyncio.run(asyncio.wait_for(server.seed(base_url, stores), SEED_TIMEOUT_S))
            log(
                f"{server.name}: {len(cards)} cards in {len(stores)} store(s) created and credited "
                f"in {time.monotonic() - started:.1f} s"
            )
            if server.name in OUR_SERVERS and args.webhook_sink is not None:
                asyncio.run(subscribe(base_url, stores, args.webhook_sink.url))
            script = write_lua_script(work, cards, stores, server.route, CheckoutBody.read(args.body))
            cells = []
            for connections in args.connections:
                checkpoint(server_url)
                busy_before = wait_until_quiet(args.quiet_wait)
                run_wrk(
                    base_url,
                    script,
                    connections,
                    args.warmup,
                    f"warm{connections}-{secrets.token_hex(3)}",
                    args.wrk_threads,
                )
                before = cpu_sample(process.pid, args.postgres_uid, server.database)
                delivered_before = _delivered(server, args)
                figures = run_wrk(
                    base_url,
                    script,
                    connections,
                    args.seconds,
                    f"c{connections}-{secrets.token_hex(3)}",
                    args.wrk_threads,
                )
                cell = cell_of(server.name, connections, figures)
                cell.stores = len(stores)
                cell.busy_cores_before, cell.cpu = (
                    busy_before,
                    cpu_use(before, cpu_sample(process.pid, args.postgres_uid, server.database)),
                )
                cell.server_cpu_ms_per_request = round(1000 * cell.cpu["server_cores"] / cell.requests_per_s, 3)
                if delivered_before is not None and cell.requests:
                    cell.webhooks_per_debit = round((_delivered(server, args) - delivered_before) / cell.requests, 3)
                cells.append(cell)
                log(describe(cell))
            if profile and server.name == args.profile_server and args.profile_seconds > 0:
                profile_under_load(process.pid, base_url, script, args, work)
            return cells
    finally:
        drop_database(server_url, server.database)


def _delivered(server: Server, args: argparse.Namespace) -> int | None:
    """The sink's count so far, when this server delivers to it."""
    if server.name not in OUR_SERVERS or args.webhook_sink is None:
        return None
    return args.webhook_sink.deliveries


def describe(cell: Cell) -> str:
    webhooks = "" if cell.webhooks_per_debit is None else f"  webhooks {cell.webhooks_per_debit:.2f}/Debit"
    return (
        f"  {cell.server:<13} {cell.connections:>3} conns  {cell.requests_per_s:>8,.0f} req/s  "
        f"p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:7.2f} ms  non-2xx {cell.non_2xx}  socket errors {cell.socket_errors}  "
        f"cores: machine {cell.cpu['machine_cores']:.2f} server {cell.cpu['server_cores']:.2f} "
        f"postgres {cell.cpu['postgres_cores']:.2f} (busy before {cell.busy_cores_before:.2f}){webhooks}"
    )


# ---- profiling our service under load --------------------------------------------------------------


def profile_under_load(pid: int, base_url: str, script: Path, args: argparse.Namespace, work: Path) -> None:
    """py-spy samples our server while wrk loads it at the highest connection count (unmeasured)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        log("profile skipped: py-spy not installed (pip install py-spy)")
        return
    raw = work / f"{args.profile_server}.collapsed"
    seconds = args.profile_seconds
    spy = subprocess.Popen(
        # --subprocesses: serve's background process (projections, webhooks) is its child, and about
        # half the server's CPU under load (docs/benchmarks.md, "What row-level security cost").
        [py_spy, "record", "--pid", str(pid), "--subprocesses", "--duration", str(round(seconds)), "--rate", "250",
         "--format", "raw", "--output", str(raw), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        run_wrk(base_url, script, max(args.connections), seconds + 1, f"prof-{secrets.token_hex(3)}", args.wrk_threads)
        _, errors = spy.communicate(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not raw.exists():
        log(f"profile failed: {errors.strip()}")
        return
    args.profile_result = {"server": args.profile_server, **summarize_profile(raw.read_text())}
    if args.profile_output:
        shutil.copy(raw, args.profile_output)
    print(format_profile(args.profile_result), file=sys.stderr, flush=True)


_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_label(frame: str) -> str:
    """``function (path:line)`` as ``function (short/path)``: lines merged, paths made readable."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['name']} ({path})"


def area_of(label: str) -> str:
    """Which part of the stack a frame belongs to, for a where-does-the-time-go summary."""
    for area in (
        "hub/",
        "ledger/",
        "aiohttp/",
        "asyncpg/",
        "eventsourcing/",
        "msgspec",
        "logging/",
        "asyncio/",
        "uuid",
        "hashlib",
        "json/",
        "decimal",
        "datetime",
    ):
        if area in label:
            return area.rstrip("/")
    return "other"


def summarize_profile(collapsed: str, top: int = 25) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_label(f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        areas[area_of(frames[-1])] += count
        for label in set(frames):
            total[label] += count
    ours_total = [(label, n) for label, n in total.most_common() if area_of(label) in ("hub", "ledger")]

    def pct(n: int) -> float:
        return round(100 * n / samples, 1) if samples else 0.0

    return {
        "samples": samples,
        "self_top": [{"function": k, "pct": pct(v)} for k, v in own.most_common(top)],
        "our_code_inclusive_top": [{"function": k, "pct": pct(v)} for k, v in ours_total[:top]],
        "self_by_area": [{"area": k, "pct": pct(v)} for k, v in areas.most_common()],
    }


def format_profile(profile: dict[str, Any]) -> str:
    lines = [
        f"\nprofile of {profile.get('server', OURS)} under load ({profile['samples']} samples, on-CPU only)",
        "self time by area:",
    ]
    lines += [f"  {a['pct']:5.1f} %  {a['area']}" for a in profile["self_by_area"]]
    lines.append("top functions by self time:")
    lines += [f"  {f['pct']:5.1f} %  {f['function']}" for f in profile["self_top"]]
    lines.append("our code, inclusive time (the function and what it calls):")
    lines += [f"  {f['pct']:5.1f} %  {f['function']}" for f in profile["our_code_inclusive_top"]]
    return "\n".join(lines)


# ---- the report --------------------------------------------------------------------------------


def median_cells(every_round: list[Cell]) -> list[Cell]:
    """Per server and connection count, the round with the median req/s (lower middle if even).

    On a shared two-core machine one round can land on a busy moment; the servers take turns
    in every round, so the median round of each is the fairer comparison. Its latencies are
    that same round's, so every figure of a row comes from one wrk run.
    """
    groups: dict[tuple[str, int], list[Cell]] = collections.defaultdict(list)
    for cell in every_round:
        groups[(cell.server, cell.connections)].append(cell)
    chosen = []
    for rounds in groups.values():
        ranked = sorted(rounds, key=lambda c: c.requests_per_s)
        median = ranked[(len(ranked) - 1) // 2]
        median.rounds_requests_per_s = [round(c.requests_per_s, 1) for c in rounds]
        chosen.append(median)
    return chosen


def add_ratios(cells: list[Cell]) -> None:
    rate = {(c.server, c.connections): c.requests_per_s for c in cells}
    for cell in cells:
        conventional = rate.get((CONVENTIONAL, cell.connections))
        lean = rate.get((LEAN, cell.connections))
        cell.vs_conventional = round(cell.requests_per_s / conventional, 2) if conventional else None
        cell.vs_lean = round(cell.requests_per_s / lean, 2) if lean else None
        direct = rate.get((OURS, cell.connections))
        if cell.server == OURS_HUB and direct:
            cell.hub_vs_direct = round(cell.requests_per_s / direct, 3)


def row_order(c: Cell) -> tuple[int, bool, int, str]:
    """By connection count, ours first (direct before hub, then the variants), then the baselines."""
    ours_rank = OUR_SERVERS.index(c.server) if c.server in OUR_SERVERS else len(OUR_SERVERS)
    return (c.connections, c.server not in OUR_SERVERS, ours_rank, c.server)


def table(cells: list[Cell]) -> str:
    def ratio(value: float | None) -> str:
        return f"{value:.2f} x" if value is not None else "-"

    def share(value: float | None) -> str:
        return f"{100 * value:.1f} %" if value is not None else "-"

    lines = [
        "| server | stores | connections | req/s | p50 ms | p99 ms | non-2xx | ratio vs conventional | ratio vs lean "
        "| hub / direct |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in sorted(cells, key=row_order):
        lines.append(
            f"| {c.server} | {c.stores} | {c.connections} | {c.requests_per_s:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} "
            f"| {c.non_2xx} | {ratio(c.vs_conventional)} | {ratio(c.vs_lean)} | {share(c.hub_vs_direct)} |"
        )
    return "\n".join(lines)


def cpu_table(cells: list[Cell]) -> str:
    """Who used the two cores: a server near 1.0 core (one process) is CPU-bound; machine cores
    well above server + PostgreSQL + wrk (~0.2) means something else was running."""
    lines = [
        "| server | connections | req/s each round | server cores | server CPU ms/req | PostgreSQL cores | machine cores "
        "| machine busy before | webhooks per Debit |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in sorted(cells, key=row_order):
        lines.append(
            f"| {c.server} | {c.connections} | {' / '.join(f'{r:,.0f}' for r in c.rounds_requests_per_s)} "
            f"| {c.cpu['server_cores']:.2f} | {c.server_cpu_ms_per_request:.2f} "
            f"| {c.cpu['postgres_cores']:.2f} | {c.cpu['machine_cores']:.2f} | {c.busy_cores_before:.2f} "
            f"| {'-' if c.webhooks_per_debit is None else f'{c.webhooks_per_debit:.2f}'} |"
        )
    return "\n".join(lines)


def targets(cells: list[Cell]) -> list[dict[str, Any]]:
    """The project's targets for our rows at the highest connection count measured."""
    top = max(c.connections for c in cells)
    verdicts = []
    for c in cells:
        if c.connections != top or c.server not in (OURS, OURS_W2):  # the hub path has a target of its own
            continue
        verdicts.append(
            {
                "server": c.server,
                "connections": top,
                "vs_conventional": c.vs_conventional,
                "vs_conventional_met": c.vs_conventional is not None and c.vs_conventional >= TARGET_VS_CONVENTIONAL,
                "p99_ms": round(c.p99_ms, 2),
                "p99_met": c.p99_ms < TARGET_P99_MS,
                "vs_lean": c.vs_lean,
                "matches_lean": c.vs_lean is not None and c.vs_lean >= 1.0,
            }
        )
    return verdicts


def hub_targets(cells: list[Cell]) -> list[dict[str, Any]]:
    """The hub's forwarding overhead at every connection count: hub req/s over direct req/s."""
    return [
        {
            "connections": c.connections,
            "hub_vs_direct": c.hub_vs_direct,
            "target": TARGET_HUB_VS_DIRECT,
            "met": c.hub_vs_direct >= TARGET_HUB_VS_DIRECT,
        }
        for c in sorted(cells, key=row_order)
        if c.hub_vs_direct is not None
    ]


class Cost(NamedTuple):
    """What a feature costs: the throughput of the server that has it over the same server's without it."""

    what: str
    measured: str  # the server that pays for it
    reference: str  # the same server without it


COSTS = (
    Cost(f"{MANY_STORES} stores (issue 23)", OURS_100T, OURS),
    Cost("row-level security, one store (issue 23)", OURS_RLS, OURS),
    Cost("sealing personal data (issue 24)", OURS, OURS_PLAIN),
)


def cost_targets(cells: list[Cell]) -> list[dict[str, Any]]:
    """Each cost whose two servers ran, at every connection count: measured req/s over reference req/s."""
    cell_of = {(c.server, c.connections): c for c in cells}
    verdicts = []
    for cost in COSTS:
        for connections in sorted({c.connections for c in cells}):
            measured, reference = cell_of.get((cost.measured, connections)), cell_of.get((cost.reference, connections))
            if measured and reference:
                ratio = round(measured.requests_per_s / reference.requests_per_s, 3)
                verdicts.append(
                    {
                        "cost": cost.what,
                        "servers": f"{cost.measured} / {cost.reference}",
                        "stores": f"{measured.stores} / {reference.stores}",  # --tenants sets ours'
                        "connections": connections,
                        "measured_requests_per_s": round(measured.requests_per_s, 1),
                        "reference_requests_per_s": round(reference.requests_per_s, 1),
                        "ratio": ratio,
                        "target": TARGET_COST_RATIO,
                        "met": ratio >= TARGET_COST_RATIO,
                    }
                )
    return verdicts


def format_cost_targets(verdicts: list[dict[str, Any]]) -> str:
    lines = ["| cost | connections | ratio | stores | req/s | target |", "|---|--:|--:|--:|--:|---|"]
    for v in verdicts:
        lines.append(
            f"| {v['cost']} | {v['connections']} | {v['servers']} = {v['ratio']:.3f} | {v['stores']} "
            f"| {v['measured_requests_per_s']:,.0f} / {v['reference_requests_per_s']:,.0f} "
            f"| >= {v['target']:g}: {met(v['met'])} |"
        )
    return "\n".join(lines)


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def format_hub_targets(verdicts: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{OURS_HUB} at {v['connections']} connections: >= {100 * v['target']:g} % of direct "
        f"({100 * v['hub_vs_direct']:.1f} %): {met(v['met'])}"
        for v in verdicts
    )


def format_targets(verdicts: list[dict[str, Any]]) -> str:
    def against(ratio: float | None, ok: bool) -> str:
        return "not measured" if ratio is None else f"({ratio}x): {met(ok)}"

    return "\n".join(
        f"{v['server']} at {v['connections']} connections: >= {TARGET_VS_CONVENTIONAL:g}x conventional "
        f"{against(v['vs_conventional'], v['vs_conventional_met'])}; p99 < {TARGET_P99_MS:g} ms "
        f"({v['p99_ms']} ms): {met(v['p99_met'])}; stretch, match lean {against(v['vs_lean'], v['matches_lean'])}"
        for v in verdicts
    )


def code_version() -> dict[str, Any]:
    """Which code was measured: the commit, and whether the work tree differed from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "hub", "ledger", "projections").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_service_files": len(changed)}


def wrk_version() -> str:
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).splitlines()[0].strip()


def report(args: argparse.Namespace, cells: list[Cell], facts: dict[str, str], skipped: list[str]) -> dict[str, Any]:
    return {
        "benchmark": "http_debits",
        "command": shlex.join(["python", "-m", "bench.http_debits", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": code_version(),
        "ours_env": args.ours_env,
        "cpus": os.cpu_count(),
        # Other work on the machine skews every figure: the load averages say how quiet it was.
        "loadavg_at_start": args.loadavg_at_start,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "wrk": wrk_version(),
        "wrk_threads": args.wrk_threads,
        "warmup_s": args.warmup,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "cards": CARDS,
        "card_credit": CARD_CREDIT,
        "debit_body": str(args.body),
        "debit_value": CheckoutBody.read(args.body).value,
        "server": facts,
        "skipped": skipped,
        "results": [asdict(c) for c in cells],
        "targets": targets(cells),
        "hub_targets": hub_targets(cells),
        "tenants": args.tenants,
        "cost_targets": cost_targets(cells),
        "profile": getattr(args, "profile_result", None),
    }


# ---- the run ---------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("GIFTCARD_DATABASE_URL", DEFAULT_SERVER_URL),
        help="the PostgreSQL server to run on (any database of it: each server gets a fresh one); "
        "default $GIFTCARD_DATABASE_URL, else %(default)s",
    )
    parser.add_argument(
        "--bench-database", default="giftcard_bench_http", help="name prefix of the databases, dropped after the run"
    )
    parser.add_argument(
        "--body",
        type=Path,
        default=CHECKOUT_BODY,
        help="the Debit a checkout sends, with {{redemptionCode}} and {{requestId}} blanks (default: ../shared/bench/debit-body.json)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per server and connection count")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured load before each measurement")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times every server is measured, in turns; the median round is reported (default %(default)s)",
    )
    parser.add_argument(
        "--no-webhooks",
        action="store_true",
        help="no webhook subscription on our servers (default: every Debit delivered to a loopback sink, as shipped)",
    )
    parser.add_argument("--quick", action="store_true", help="4 s measured, 1 s warm-up, one round: a smoke run")
    parser.add_argument(
        "--connections", type=int_list, default=list(CONNECTIONS), help="comma-separated (default 16,64)"
    )
    parser.add_argument(
        "--servers",
        type=lambda s: s.split(","),
        default=[OURS, OURS_HUB, OURS_W2, CONVENTIONAL, LEAN],
        help=f"comma-separated subset of {','.join([*OUR_SERVERS, CONVENTIONAL, LEAN])} "
        "(every ratio to ours needs ours in the same run; default: all but ours-rls, ours-100t and ours-plain, "
        "which issues 23 and 24 measure: --servers ours,ours-rls,ours-100t,ours-plain)",
    )
    parser.add_argument(
        "--tenants",
        type=int,
        default=1,
        metavar="N",
        help="spread the cards of ours (and ours-hub, ours-w2, ours-plain) round-robin over N stores, each with "
        "its own keys; N > 1 runs them as the service's database role (default 1: the default store, as today)",
    )
    parser.add_argument(
        "--wrk-threads",
        type=int,
        default=1,
        help="wrk threads (default 1: on a small machine wrk competes with the server for cores)",
    )
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for our service, e.g. GIFTCARD_RUN_PROJECTIONS=false (repeatable; default: as shipped)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each cell, wait up to this long for the machine to be idle (default %(default)s s)",
    )
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=0.0,
        help="after measuring ours, sample it with py-spy for this long under load (unmeasured)",
    )
    parser.add_argument(
        "--profile-server", default=OURS, choices=OUR_SERVERS, help="which of ours to profile (default %(default)s)"
    )
    parser.add_argument("--profile-output", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure here")
    args = parser.parse_args(argv)
    unknown = set(args.servers) - {*OUR_SERVERS, CONVENTIONAL, LEAN}
    if unknown:  # a misspelt name would otherwise just measure nothing
        parser.error(f"--servers: unknown {', '.join(sorted(unknown))}")
    if not 1 <= args.tenants <= CARDS:
        parser.error(f"--tenants: between 1 and {CARDS} (the cards), got {args.tenants}")
    if args.quick:
        args.seconds, args.warmup, args.rounds = 4.0, 1.0, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.loadavg_at_start = [round(x, 2) for x in os.getloadavg()]
    args.postgres_uid = postgres_uid()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    # SIGTERM becomes SystemExit, so the ``finally`` blocks stop the servers and drop the databases.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.workers_variant = OURS_W2 in args.servers and serve_supports_workers()
    skipped = (
        []
        if args.workers_variant or OURS_W2 not in args.servers
        else [f"{OURS_W2}: giftcard serve has no --workers option"]
    )
    for note in skipped:
        log(f"skipped {note}")
    credentials = Credentials.generated()
    facts = server_facts(args.database_url)
    servers = contenders(args, credentials)
    args.role = Role.generated()
    every_round: list[Cell] = []
    with (
        tempfile.TemporaryDirectory(prefix="giftcard-http-bench-") as tmp,
        running_sink() as sink,
        service_role(args.database_url, args.role, any(s.isolated for s in servers)),
    ):
        args.webhook_sink = None if args.no_webhooks else sink
        for number in range(args.rounds):
            log(f"round {number + 1} of {args.rounds}")
            for server in servers:
                cells = measure_server(server, args.database_url, args, Path(tmp), credentials, profile=number == 0)
                for cell in cells:
                    cell.round = number
                every_round += cells
        log(f"webhooks: {sink.deliveries} deliveries received" if not args.no_webhooks else "webhooks: off")
    cells = median_cells(every_round)
    add_ratios(cells)
    figures = report(args, cells, facts, skipped)
    figures["webhook_deliveries"] = sink.deliveries
    figures["every_round"] = [asdict(c) for c in every_round]
    print(table(cells))
    print()
    print(cpu_table(cells))
    print()
    print(format_targets(figures["targets"]))
    if figures["hub_targets"]:
        print(format_hub_targets(figures["hub_targets"]))
    if figures["cost_targets"]:
        print()
        print(format_cost_targets(figures["cost_targets"]))
    if any(c.non_2xx or c.socket_errors for c in cells):
        print("WARNING: some requests failed (non-2xx or socket errors): the figures above are not clean")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
