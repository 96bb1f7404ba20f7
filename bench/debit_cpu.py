"""The web process's CPU per checkout Debit, in isolation: one code version against another.

The HTTP benchmark (``bench.http_debits``) measures throughput beside PostgreSQL, the webhook
sink and wrk on the same two cores, so a change worth 5 % of the web process's CPU is lost in
its noise. This measures only what the change moves: the CPU the web process spends per Debit.

Each code version runs as ``giftcard serve``'s web worker runs it (``hub.cli.serve.run_worker``:
uvloop, ``HubRunner``, the JSON access line on, the start-up objects frozen; projections and
webhooks off, as they run in serve's background process), in a process of its own, on a fresh
database of its own, with 1,000 cards it created and credited itself. A client in another
process (uvloop, raw keep-alive connections) posts the checkout's Debit body
(``../shared/bench/debit-body.json``, each with the card's redemption code and a fresh
requestId) at ``--connections`` connections; the server's CPU is read from /proc (every thread,
nanoseconds) right before and after each run. A sample is one run of ``--debits`` Debits after a
warm-up; the versions take turns, ``--repeats`` times. The result is the median of the repeats' ratios
(each repeat measures both versions back to back, so load that comes and goes over the whole
benchmark cancels out), beside each version's least sample (the one the machine disturbed least).

``--baseline-rev REV`` runs the code of a git revision beside the working tree's: ``git archive``
extracts it into a temporary directory, which its server imports first (nothing is checked out,
no worktree is added). ``--profile FILE`` also samples the working tree's server with py-spy
(``-r 250 -f raw``) under the same load, and prints where its time goes.

    python -m bench.debit_cpu --database-url postgresql://postgres@127.0.0.1:5432/postgres --baseline-rev main
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg

from bench.arguments import add_database_url
from bench.event_store_appends import database_server, drop_database, recreate_database
from bench.http_debits import (
    CHECKOUT_BODY,
    HOST,
    CheckoutBody,
    Credentials,
    format_profile,
    free_port,
    seed_ours,
    service_env,
    summarize_profile,
    wait_ready,
)
from bench.report import write_json

REPO = Path(__file__).resolve().parents[1]
DATABASE_PREFIX = "giftcard_debit_cpu"
CLIENT_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 15.0
PROFILE_RATE_HZ = 250


def tree_script(body: str, log_level: str = "INFO") -> str:
    """A script run from whichever tree is first on PYTHONPATH: it logs as serve does, then says
    whose code it imported (``check_serves_tree`` reads that line), then runs ``body``."""
    return f"""
import logging, sys
import hub
from hub.logs import configure_logging

configure_logging(logging.{log_level})
print("serving the code of", hub.__file__, file=sys.stderr, flush=True)
{body}"""


# The web worker of ``giftcard serve``. Written against what every recent revision has (run_worker,
# Settings.from_env), so a baseline runs it too.
SERVER_SCRIPT = tree_script("""
import msgspec
from hub.cli.serve import run_worker
from hub.config import Settings

settings = msgspec.structs.replace(Settings.from_env(), run_projections=False, run_webhooks=False, workers=1)
run_worker(settings, sys.argv[1], sys.argv[2], int(sys.argv[3]), reuse_port=False)
""")


# ---- the servers: one per code version ---------------------------------------------------------


@dataclass
class Version:
    """One code version's server, and what was measured of it."""

    name: str
    tree: Path
    database: str
    pid: int = 0
    port: int = 0
    cards: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    samples_us: list[float] = field(default_factory=list)  # server CPU per Debit, one per run
    per_commit: list[float] = field(default_factory=list)  # Debits per group commit, one per run
    database_us: list[float] = field(default_factory=list)  # its PostgreSQL backends' CPU per Debit, per run

    @property
    def least_us(self) -> float:
        return min(self.samples_us)


@contextmanager
def baseline_tree(rev: str, directory: Path) -> Iterator[Path]:
    """The files of ``rev`` (as ``git archive`` gives them) in ``directory``."""
    tree = directory / "baseline"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    yield tree


@contextmanager
def running_server(
    version: Version, server_url: str, credentials: Credentials, work: Path, *, keep_database: bool = False
) -> Iterator[None]:
    """The version's web worker on a loopback port, seeded with its cards, until the block ends
    (and its database with it, unless ``keep_database``)."""
    url = version.url = asyncio.run(recreate_database(server_url, version.database))
    version.port = free_port()
    env = {
        **os.environ,
        **serve_env(credentials),
        "GIFTCARD_DATABASE_URL": url,
        "PYTHONPATH": str(version.tree),  # before the editable install's finder: this tree's code runs
    }
    log_path = work / f"{version.name}.log"  # the access lines go here, as serve's go to its stderr
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, url, HOST, str(version.port)],
            env=env,
            cwd=version.tree,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base_url = f"http://{HOST}:{version.port}"
        asyncio.run(wait_ready(process, base_url, log_path))
        check_serves_tree(log_path, version.tree)
        version.pid = process.pid
        version.cards = asyncio.run(seed_ours(base_url, [credentials]))
        say(f"{version.name}: serving {version.tree} on port {version.port}, {len(version.cards)} cards")
        yield
    finally:
        stop(process)
        if not keep_database:
            asyncio.run(drop_database(server_url, version.database))


def serve_env(credentials: Credentials) -> dict[str, str]:
    """What serve's processes share: the keys, and the secret that seals personal data and webhook secrets
    as in production; the webhook sink is on loopback, which the egress policy refuses unless allowed."""
    return {
        **service_env(credentials),
        "GIFTCARD_SECRET_KEY": credentials.token + "-secret",
        "GIFTCARD_PROVIDER_ALLOWLIST": "127.0.0.0/8",
    }


def check_serves_tree(log_path: Path, tree: Path) -> None:
    """The server imported the version's code, not the one installed in the virtualenv."""
    served = log_path.read_text(errors="replace").split("serving the code of ", 1)[-1].split("\n", 1)[0]
    if not Path(served).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the server for {tree} imported {served}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds (/proc/PID/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(task.read_text().split()[0])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            continue
    return total


def backends_cpu_ns(database: str) -> dict[int, int]:
    """CPU time so far of each PostgreSQL backend connected to ``database`` (its process title names
    it): what a change may move from the web process to the database is seen too."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f" {database} " in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found[int(entry.name)] = cpu_ns(int(entry.name))
        except OSError:  # the process ended meanwhile
            continue
    return found


# ---- the client, in a process of its own -------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What one run of the client sends."""

    port: int
    cards: list[tuple[str, str]]
    debits: int
    connections: int
    tag: str  # makes every requestId of the run unique


class Client:
    """A spawned process that sends loads on request, so that the server's CPU is read right
    around each run (not around the client's own start-up)."""

    def __init__(self, credentials: Credentials, body: CheckoutBody) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=_client_main, args=(child, credentials.headers, body.parts), daemon=True)
        self._process.start()

    def run(self, load: Load) -> dict[str, int]:
        self._pipe.send(load)
        if not self._pipe.poll(CLIENT_TIMEOUT_S):
            raise RuntimeError(f"the client did not finish {load.debits} Debits in {CLIENT_TIMEOUT_S:.0f} s")
        answer = self._pipe.recv()
        if isinstance(answer, str):
            raise RuntimeError(f"the client failed: {answer}")
        return answer

    def close(self) -> None:
        self._pipe.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


def _client_main(pipe: Connection, headers: dict[str, str], parts: tuple[str, str, str]) -> None:
    import uvloop

    while (load := pipe.recv()) is not None:
        try:
            pipe.send(uvloop.run(send_load(load, headers, parts)))
        except Exception as e:  # reported to the parent, which stops the benchmark
            pipe.send(f"{type(e).__name__}: {e}")


async def send_load(load: Load, headers: dict[str, str], parts: tuple[str, str, str]) -> dict[str, int]:
    """``load.debits`` Debits over ``load.connections`` keep-alive connections, each sending its next
    request when the last is answered; consecutive requests go to different cards."""
    head, middle, tail = parts
    fixed = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    statuses: dict[int, int] = {}
    sent = iter(range(load.debits))

    def request(n: int) -> bytes:
        card_id, code, _ = load.cards[n % len(load.cards)]
        body = f"{head}{code}{middle}{load.tag}-{n}{tail}".encode()
        return (
            f"POST /native/giftcards/{card_id}/transactions HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Content-Type: application/json\r\n{fixed}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(HOST, load.port)
        try:
            for n in sent:
                writer.write(request(n))
                status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
                length = next(int(line[15:]) for line in lines if line[:15].lower() == b"content-length:")
                await reader.readexactly(length)
                status = int(status_line.split()[1])
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(load.connections)))
    return statuses


# ---- measuring ------------------------------------------------------------------------------------


def measure(version: Version, client: Client, args: argparse.Namespace, run: str) -> float:
    """One warm-up, then one measured run: the server's CPU per Debit in µs."""
    client.run(Load(version.port, version.cards, args.warmup_debits, args.connections, f"{run}w"))
    last_position = asyncio.run(_fetchval(version.url, "select coalesce(max(position), 0) from events"))
    before, backends_before = cpu_ns(version.pid), backends_cpu_ns(version.database)
    statuses = client.run(Load(version.port, version.cards, args.debits, args.connections, run))
    spent_ns = cpu_ns(version.pid) - before
    backends_ns = sum(ns - backends_before.get(pid, 0) for pid, ns in backends_cpu_ns(version.database).items())
    if set(statuses) != {200}:
        raise RuntimeError(f"{version.name}: answers other than 200: {statuses} (see its log)")
    # Each group commit is one transaction: its rows share their xmin.
    commits = asyncio.run(
        _fetchval(version.url, f"select count(distinct xmin::text) from events where position > {last_position}")
    )
    version.per_commit.append(args.debits / commits)
    version.database_us.append(backends_ns / 1000 / args.debits)
    return spent_ns / 1000 / args.debits


async def _fetchval(url: str, query: str) -> Any:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(query)
    finally:
        await connection.close()


def profile(version: Version, client: Client, args: argparse.Namespace) -> dict[str, Any] | None:
    """py-spy's on-CPU samples of the server while the client sends ``--debits`` × 3 Debits."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        say("profile skipped: py-spy is not installed (pip install py-spy)")
        return None
    argv = [py_spy, "record", "--pid", str(version.pid), "--rate", str(PROFILE_RATE_HZ), "--format", "raw",
            "--output", str(args.profile), *(["--native"] if args.native else ["--nonblocking"])]  # fmt: skip
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # py-spy attaches
        client.run(Load(version.port, version.cards, 3 * args.debits, args.connections, f"profile-{time.time_ns()}"))
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        _, errors = spy.communicate(timeout=60)
    if not args.profile.exists():
        say(f"profile failed: {errors.strip()}")
        return None
    return summarize_profile(args.profile.read_text())


def paired_ratios(current: Version, baseline: Version) -> list[float]:
    """Each repeat's two runs were measured back to back: their ratio is the least disturbed by
    load that comes and goes over a whole benchmark."""
    return sorted(c / b for c, b in zip(current.samples_us, baseline.samples_us, strict=True))


def ratio_line(current: Version, baseline: Version) -> str:
    least = current.least_us / baseline.least_us
    paired = paired_ratios(current, baseline)
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    return (
        f"{current.name} / {baseline.name}: {statistics.median(paired):.3f} the median of the repeats' ratios "
        f"(quartiles {quartiles[0]:.3f} to {quartiles[2]:.3f}), {least:.3f} of the least samples"
    )


def describe(version: Version) -> str:
    samples = " ".join(f"{s:.0f}" for s in version.samples_us)
    return (
        f"{version.name:<9} least {version.least_us:6.1f} µs/Debit  median {statistics.median(version.samples_us):6.1f}"
        f"  (every run: {samples}); PostgreSQL's backends least {min(version.database_us):.0f} µs/Debit"
    )


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    credentials = Credentials.generated()
    body = CheckoutBody.read(args.body)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="giftcard-debit-cpu-")))
        server_url = stack.enter_context(database_server(args.database_url))
        versions = [Version("current", REPO, f"{DATABASE_PREFIX}_current")]
        if args.baseline_rev:
            tree = stack.enter_context(baseline_tree(args.baseline_rev, work))
            versions.append(Version(f"baseline ({args.baseline_rev})", tree, f"{DATABASE_PREFIX}_baseline"))
        for version in versions:
            stack.enter_context(running_server(version, server_url, credentials, work))
        client = Client(credentials, body)
        stack.callback(client.close)
        for repeat in range(args.repeats):
            # Turns alternate, so neither version always runs right after the other.
            for version in versions if repeat % 2 == 0 else versions[::-1]:
                version.samples_us.append(measure(version, client, args, f"r{repeat}-{time.time_ns()}"))
                say(
                    f"  run {repeat + 1}: {version.name:<9} {version.samples_us[-1]:6.1f} µs/Debit, "
                    f"{version.per_commit[-1]:.1f} Debits per commit, PostgreSQL {version.database_us[-1]:.0f} µs/Debit"
                )
        say("")
        for version in versions:
            say(describe(version))
        if len(versions) == 2:
            say(ratio_line(*versions))
        profiled = profile(versions[0], client, args) if args.profile else None
        if profiled is not None:
            say(format_profile({"server": versions[0].name, **profiled}))
        return {
            "connections": args.connections,
            "debits_per_run": args.debits,
            "load_average": os.getloadavg(),
            "versions": {
                v.name: {
                    "least_us": v.least_us,
                    "samples_us": v.samples_us,
                    "debits_per_commit": v.per_commit,
                    "database_us": v.database_us,
                }
                for v in versions
            },
            "paired_ratios": paired_ratios(*versions) if len(versions) == 2 else None,
            "profile": profiled,
        }


def paired_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark that measures the working tree beside a revision, on the checkout's Debit."""
    parser = argparse.ArgumentParser(description=description)
    add_database_url(parser, "the PostgreSQL server to create the benchmark's databases on")
    parser.add_argument("--baseline-rev", help="a git revision to measure beside the working tree, e.g. main")
    parser.add_argument("--body", type=Path, default=CHECKOUT_BODY, help="the checkout's Debit body (JSON)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure here")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = paired_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=16, help="client connections (default 16)")
    parser.add_argument("--debits", type=int, default=3000, help="Debits per measured run (default 3000)")
    parser.add_argument("--warmup-debits", type=int, default=500, help="Debits before each measured run (default 500)")
    parser.add_argument("--repeats", type=int, default=9, help="measured runs per version (default 9)")
    parser.add_argument("--profile", type=Path, metavar="FILE", help="also profile the working tree's server here")
    parser.add_argument(
        "--native",
        action="store_true",
        help="the profile shows native frames (C, Cython) too; py-spy then pauses the server at each sample",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    write_json(args.json, run(args))  # only with --json
    return 0


if __name__ == "__main__":
    sys.exit(main())
