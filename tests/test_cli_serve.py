"""`giftcard serve` as a real process: it starts, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from hub.cli.projections import START_RETRY_S, _pools_once_reachable
from hub.cli.serve import BACKGROUND_NICENESS
from hub.config import Settings
from tests.conftest import HUB_KEY, HUB_TOKEN
from tests.providers.serving import serve as serve_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(url: str, timeout_s: float = 20.0) -> None:
    async with aiohttp.ClientSession() as session:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                async with session.get(url + "/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("service did not become healthy")
            await asyncio.sleep(0.1)


async def wait_projected(session: aiohttp.ClientSession, url: str, timeout_s: float = 20.0) -> None:
    """The read model shows the card: the projection runner that serve started is at work."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with session.get(url) as response:
            if response.status == 200:
                return
            assert response.status == 404, await response.text()
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{url} never projected")
        await asyncio.sleep(0.1)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux's /proc), e.g. serve's workers and runner."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            if parent == pid:
                found.append(int(entry))
    return found


def niceness(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19 of proc(5), after "pid (comm)"
    except (OSError, ValueError, IndexError):
        return None


RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def rfc3339(ts: str) -> datetime:
    """A log line's ``ts``, which must be RFC 3339 in UTC (``Z``), with milliseconds."""
    assert RFC3339_UTC.fullmatch(ts), ts
    return datetime.fromisoformat(ts)


async def wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while alive := [pid for pid in pids if os.path.exists(f"/proc/{pid}")]:
        assert asyncio.get_running_loop().time() < deadline, f"{alive} still running after serve ended"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_runs_and_stops_cleanly_on_sigterm(database_url, workers):
    port = free_port()
    env = {
        **os.environ,
        "GIFTCARD_DATABASE_URL": database_url,
        "GIFTCARD_APP_KEY": HUB_KEY,
        "GIFTCARD_APP_TOKEN": HUB_TOKEN,
        "GIFTCARD_PROVIDER_APP_KEY": "p",
        "GIFTCARD_PROVIDER_APP_TOKEN": "p",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base)
        headers = {"X-VTEX-API-AppKey": HUB_KEY, "X-VTEX-API-AppToken": HUB_TOKEN}
        async with aiohttp.ClientSession(headers=headers) as session:
            body = {"relationName": "r", "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"}
            async with session.post(base + "/api/giftcards", json=body) as response:
                assert response.status == 200
                card_id = (await response.json())["id"]
            async with session.get(base + "/readyz") as response:
                assert response.status == 200
            await wait_projected(session, f"{base}/api/ledger/balances/{card_id}")
        children = children_of(process.pid)
        assert BACKGROUND_NICENESS in map(niceness, children), "the runner yields the CPU to requests"
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert b"Traceback" not in stderr
        await wait_gone(children)
        access = [line for line in map(json.loads, stderr.decode().splitlines()[1:]) if line["message"] == "request"]
        created = [line for line in access if line["method"] == "POST" and line["path"] == "/api/giftcards"]
        assert len(created) == 1, "one access line per request"
        assert created[0]["status"] == 200 and created[0]["route"] == "/api/giftcards"
        assert created[0]["level"] == "INFO" and created[0]["latency_ms"] > 0 and created[0]["request_id"]
        assert abs(datetime.now(UTC) - rfc3339(created[0]["ts"])) < timedelta(minutes=2)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_projection_runner_does_not_outlive_a_killed_serve(database_url):
    """SIGKILL gives serve no chance to stop its children: the runner notices on its own."""
    env = {**os.environ, "GIFTCARD_DATABASE_URL": database_url, "GIFTCARD_APP_KEY": HUB_KEY}
    env |= {"GIFTCARD_APP_TOKEN": HUB_TOKEN, "GIFTCARD_PROVIDER_APP_KEY": "p", "GIFTCARD_PROVIDER_APP_TOKEN": "p"}
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "serve", "--port", str(port), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_healthy(f"http://127.0.0.1:{port}")
        children = children_of(process.pid)
        assert children, "serve started no process beside itself"
    finally:
        process.kill()
        await process.wait()
    await wait_gone(children)


# ---- serve --workers N under its supervisor ------------------------------------------------------


def serving_workers(serve_pid: int) -> set[int]:
    """serve's web workers: its children started by multiprocessing's spawn (projections are off)."""
    found = set()
    for pid in children_of(serve_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    found.add(pid)
        except OSError:
            continue
    return found


def gauge_pids(metrics_dir) -> set[int]:
    """Workers whose live gauges are in the Prometheus folder: each scrape writes the answering one's."""
    return {int(path.stem.rsplit("_", 1)[1]) for path in metrics_dir.glob("gauge_*.db")}


async def start_workers(database_url: str, port: int, metrics_dir, count: int = 2) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIFTCARD_")}
    env |= {"GIFTCARD_DATABASE_URL": database_url, "GIFTCARD_APP_KEY": HUB_KEY, "GIFTCARD_APP_TOKEN": HUB_TOKEN}
    env |= {"GIFTCARD_PROVIDER_APP_KEY": "p", "GIFTCARD_PROVIDER_APP_TOKEN": "p", "GIFTCARD_RUN_PROJECTIONS": "false"}
    env |= {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "GIFTCARD_RUN_WEBHOOKS": "false"}  # no background process
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "serve", "--port", str(port), "--workers", str(count), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await wait_healthy(f"http://127.0.0.1:{port}")
    return process


def fresh_connections() -> aiohttp.ClientSession:
    """A new connection per request, so the kernel picks a worker for each (SO_REUSEPORT)."""
    timeout = aiohttp.ClientTimeout(total=10)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=timeout)


async def kill_serve(process: asyncio.subprocess.Process, workers: set[int] = frozenset()) -> None:
    """serve and its workers, however the test ended: a worker left behind would hold stderr's pipe."""
    for pid in workers | (serving_workers(process.pid) if process.returncode is None else set()):
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    if process.returncode is None:
        process.kill()
    await asyncio.wait_for(process.communicate(), timeout=30)


async def wait_all_serving(session, base: str, serve_pid: int, metrics_dir, count: int, timeout_s: float = 30.0):
    """Scrapes /metrics until ``count`` workers, all current children of serve, have each answered one:
    every one of them accepts connections. Every answer on the way must be a 200."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with session.get(base + "/metrics") as response:
            assert response.status == 200
        workers = serving_workers(serve_pid)
        if len(workers) == count and workers <= gauge_pids(metrics_dir):
            return workers
        assert asyncio.get_running_loop().time() < deadline, (workers, gauge_pids(metrics_dir))
        await asyncio.sleep(0.05)


async def stop_serve(process: asyncio.subprocess.Process) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert b"Traceback" not in stderr, stderr.decode()[-3000:]
    return stderr.decode()


async def test_a_killed_worker_is_replaced_while_requests_keep_succeeding(database_url, tmp_path):
    port, metrics_dir = free_port(), tmp_path / "metrics"
    metrics_dir.mkdir()
    process = await start_workers(database_url, port, metrics_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        async with fresh_connections() as session:
            first = await wait_all_serving(session, base, process.pid, metrics_dir, 2)
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            await wait_gone([victim])
            for _ in range(20):  # the survivor alone, then with the replacement: never a refusal
                async with session.get(base + "/healthz") as response:
                    assert response.status == 200
            now = await wait_all_serving(session, base, process.pid, metrics_dir, 2)
        assert len(now - first) == 1 and victim not in now, (first, now)
        assert victim not in gauge_pids(metrics_dir), "the dead worker's gauges would still be answered"
        stderr = await stop_serve(process)
        assert f"worker {victim} exited (killed by SIGKILL)" in stderr
    finally:
        await kill_serve(process)


async def test_sighup_replaces_every_worker_without_refusing_a_request(database_url, tmp_path):
    port, metrics_dir = free_port(), tmp_path / "metrics"
    metrics_dir.mkdir()
    process = await start_workers(database_url, port, metrics_dir)
    base = f"http://127.0.0.1:{port}"
    first: set[int] = set()
    try:
        async with fresh_connections() as session:
            first = await wait_all_serving(session, base, process.pid, metrics_dir, 2)
            process.send_signal(signal.SIGHUP)
            deadline = asyncio.get_running_loop().time() + 30
            while serving_workers(process.pid) & first:  # the old ones stop once new ones serve
                async with session.get(base + "/healthz") as response:
                    assert response.status == 200
                assert asyncio.get_running_loop().time() < deadline, "old workers still running"
            now = await wait_all_serving(session, base, process.pid, metrics_dir, 2)
        assert not now & first
        assert not gauge_pids(metrics_dir) & first
        await stop_serve(process)
    finally:
        await kill_serve(process, first)  # a serve that died of SIGHUP leaves them behind


async def test_sigterm_lets_the_request_in_flight_finish(database_url, tmp_path):
    """A card's creation held up in the database when SIGTERM comes: no worker accepts a new
    connection any more, and the request still gets its 200 once the database lets it through."""
    port, metrics_dir = free_port(), tmp_path / "metrics"
    metrics_dir.mkdir()
    process = await start_workers(database_url, port, metrics_dir)
    blocker = await asyncpg.connect(database_url)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute("lock table events in share mode")  # appends wait; reads go on
        headers = {"X-VTEX-API-AppKey": HUB_KEY, "X-VTEX-API-AppToken": HUB_TOKEN}
        body = {"relationName": "in-flight", "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"}
        async with aiohttp.ClientSession(headers=headers) as session:
            in_flight = asyncio.create_task(session.post(f"http://127.0.0.1:{port}/api/giftcards", json=body))
            await wait_until(lambda: blocked_on_a_lock(blocker, "events"))
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            with pytest.raises(OSError):  # draining: no worker accepts a connection any more
                await asyncio.open_connection("127.0.0.1", port)
            assert not in_flight.done()
            await blocking.rollback()
            async with await asyncio.wait_for(in_flight, timeout=10) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["redemptionCode"]
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0, stderr.decode()[-3000:]
    finally:
        await blocker.close()
        await kill_serve(process)


async def blocked_on_a_lock(connection: asyncpg.Connection, table: str) -> bool:
    waiting = "select count(*) from pg_locks where not granted and relation = $1::regclass"
    return await connection.fetchval(waiting, table) > 0


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.05)


async def test_workers_do_not_outlive_a_killed_supervisor(database_url, tmp_path):
    port, metrics_dir = free_port(), tmp_path / "metrics"
    metrics_dir.mkdir()
    process = await start_workers(database_url, port, metrics_dir)
    workers: set[int] = set()
    try:
        async with fresh_connections() as session:
            workers = await wait_all_serving(session, f"http://127.0.0.1:{port}", process.pid, metrics_dir, 2)
        process.kill()
        await wait_gone(list(workers))
    finally:
        await kill_serve(process, workers)


async def test_every_line_logged_while_serving_a_request_names_it_and_every_ts_is_rfc3339_utc(database_url):
    """A failed code lookup past the caller's threshold logs a warning while the request is served."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIFTCARD_")}
    env |= {"GIFTCARD_DATABASE_URL": database_url, "GIFTCARD_APP_KEY": HUB_KEY, "GIFTCARD_APP_TOKEN": HUB_TOKEN}
    env |= {"GIFTCARD_PROVIDER_APP_KEY": "p", "GIFTCARD_PROVIDER_APP_TOKEN": "p", "GIFTCARD_RUN_PROJECTIONS": "false"}
    env |= {"GIFTCARD_LOOKUP_CALLER_FAILURES_SLOW_AFTER": "0", "GIFTCARD_LOOKUP_FAILURE_DELAY_S": "0"}
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", "serve", "--port", str(port), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_healthy(f"http://127.0.0.1:{port}")
        headers = {"X-VTEX-API-AppKey": HUB_KEY, "X-VTEX-API-AppToken": HUB_TOKEN, "X-Request-Id": "trace-me-42"}
        search = {"client": {"id": "c1"}, "cart": {"redemptionCode": "AAAA-BBBB-CCCC-0001"}}
        url = f"http://127.0.0.1:{port}/api/giftcards/_search"
        async with aiohttp.ClientSession(headers=headers) as session, session.post(url, json=search) as response:
            assert response.status == 200 and response.headers["X-Request-Id"] == "trace-me-42"
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = [json.loads(line) for line in stderr.decode().splitlines()[1:]]  # after "giftcard serving on ..."
    for line in lines:
        assert abs(datetime.now(UTC) - rfc3339(line["ts"])) < timedelta(minutes=2), line
    during = [line for line in lines if line["name"] == "hub.providers.lookup_throttle"]
    assert len(during) == 1 and "failed code lookups" in during[0]["message"], lines
    assert during[0]["request_id"] == "trace-me-42"
    assert all("request_id" not in line for line in lines if line["name"] == "hub.app"), "no request, no id"


@pytest.mark.parametrize("run_webhooks", ["true", "false"])
async def test_webhooks_are_delivered_by_serves_background_process_not_a_web_worker(database_url, run_webhooks):
    """With projections off, serve has a background process only for the webhooks, and they arrive."""
    received: list[dict] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    sink = web.Application()
    sink.router.add_post("/events", receive)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIFTCARD_")}
    env |= {"GIFTCARD_DATABASE_URL": database_url, "GIFTCARD_APP_KEY": HUB_KEY, "GIFTCARD_APP_TOKEN": HUB_TOKEN}
    env |= {"GIFTCARD_PROVIDER_APP_KEY": "p", "GIFTCARD_PROVIDER_APP_TOKEN": "p", "GIFTCARD_RUN_PROJECTIONS": "false"}
    env |= {"GIFTCARD_RUN_WEBHOOKS": run_webhooks, "GIFTCARD_SECRET_KEY": "s" * 32}
    env |= {"GIFTCARD_PROVIDER_ALLOWLIST": "127.0.0.0/8"}
    port = free_port()
    async with serve_app(sink) as sink_url:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hub.cli", "serve", "--port", str(port), env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_healthy(base)
            headers = {"X-VTEX-API-AppKey": HUB_KEY, "X-VTEX-API-AppToken": HUB_TOKEN}
            async with aiohttp.ClientSession(base, headers=headers) as session:
                async with session.post("/api/webhooks", json={"url": f"{sink_url}/events"}) as response:
                    assert response.status == 200, await response.text()
                body = {"relationName": "r", "caption": "c", "profileId": "p", "expiringDate": "2030-01-01T00:00:00Z"}
                async with session.post("/api/giftcards", json=body) as response:
                    assert response.status == 200
            for _ in range(100 if run_webhooks == "true" else 20):
                if received:
                    break
                await asyncio.sleep(0.1)
            nice = list(map(niceness, children_of(process.pid)))
            if run_webhooks == "true":
                assert [event["type"] for event in received] == ["card.issued"], received
                assert BACKGROUND_NICENESS in nice, "delivered by the background process"
            else:
                assert received == [] and BACKGROUND_NICENESS not in nice, "neither projections nor webhooks"
            await stop_serve(process)
        finally:
            await kill_serve(process)


# ---- serve's background process rides out a database that is not there yet ----------------------


async def test_the_background_process_waits_for_a_database_not_reachable_yet(database_url):
    """serve may start while its database is down (a failover under way): its web workers ride that
    out, and so must the background process (projections, webhooks), which nothing would start again.
    The database is reached through a port that refuses connections until a forwarder opens it."""
    target = urlsplit(database_url)
    socket_folder = parse_qs(target.query).get("host", [None])[0]  # the embedded server listens on a socket
    port = free_port()
    through_port = urlunsplit(target._replace(netloc=f"{target.username}@127.0.0.1:{port}", query=""))
    reaching = asyncio.create_task(_pools_once_reachable(through_port, Settings(run_webhooks=True)))
    await asyncio.sleep(2.5 * START_RETRY_S)
    assert not reaching.done(), "it gave up while the database could not be reached"

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if socket_folder:
            upstream = asyncio.open_unix_connection(f"{socket_folder}/.s.PGSQL.{target.port or 5432}")
        else:
            upstream = asyncio.open_connection(target.hostname, target.port or 5432)
        upstream_reader, upstream_writer = await upstream

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)

    forwarder = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        pool, webhook_pool = await asyncio.wait_for(reaching, 30)
        try:
            assert await pool.fetchval("select count(*) from schema_migrations") > 0
            assert await webhook_pool.fetchval("select 1") == 1
        finally:
            await asyncio.gather(pool.close(), webhook_pool.close())
    finally:
        forwarder.close()
