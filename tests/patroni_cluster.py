"""Two PostgreSQL 15 nodes under Patroni, with one etcd, on free loopback ports, for failover tests.

The failover manager is the real one (Debian's ``patroni`` and ``etcd-server`` packages): a test
SIGKILLs the leader's machine (its Patroni and its postmaster with every child, all at once) and
Patroni promotes the synchronous standby by itself; restarting the lost node makes it rejoin as a
standby through pg_rewind. PostgreSQL servers come from tests/pg_cluster.py's binaries and run as
the ``postgres`` system user, like there. Whatever ``start`` started, ``stop`` stops, also after a
failure; the logs of etcd, Patroni and PostgreSQL stay in files in the folder until then.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from tests.pg_cluster import PG_BIN, SYSTEM_USER, alive, children_of, free_port, owned_folder, pg_binaries_missing

PATRONI = shutil.which("patroni") or "/usr/bin/patroni"
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
SCOPE = "giftcard"
NODE_NAMES = ("node1", "node2")

# Failure detection. A dead leader is noticed when its leader key's lease expires: at most ``TTL``
# after its last renewal (every ``LOOP_WAIT``). The standby watches the key, so it races for it at
# once and promotes: kill to a writable new leader is about TTL - LOOP_WAIT/2 + ~1 s. Patroni's rule
# is ``loop_wait + 2 * retry_timeout <= ttl`` (1 + 2 * 4 = 9 <= 10): a leader that cannot reach
# etcd for retry_timeout gives up its role before its key can expire, so two leaders never overlap.
# Patroni 3.0.2 takes these values as they are; from 3.2 on it raises ttl to at least 20 (and
# retry_timeout to at least 3), which would make failover take about 20 s. See docs/patroni.md.
TTL_S = 10
LOOP_WAIT_S = 1
RETRY_TIMEOUT_S = 4

START_TIMEOUT_S = 90  # initdb, two servers, a base backup, on a shared 2-core machine
REJOIN_TIMEOUT_S = 90  # crash recovery in single-user mode, pg_rewind, catching up
STOP_TIMEOUT_S = 20
POLL_S = 0.1
HTTP_TIMEOUT_S = 1.0


def patroni_missing() -> str | None:
    """Why the Patroni tests cannot run here, or None."""
    reason = pg_binaries_missing()
    if reason:
        return reason
    if not os.access(PATRONI, os.X_OK):
        return "patroni not installed (Debian package patroni)"
    if not os.access(ETCD, os.X_OK):
        return "etcd not installed (Debian package etcd-server)"
    return None


def descendants_of(pid: int) -> list[int]:
    """Every process below ``pid``, grandchildren included (runuser -> patroni -> its helpers)."""
    found, queue = [], [pid]
    while queue:
        children = children_of(queue.pop())
        found.extend(children)
        queue.extend(children)
    return found


def sigkill_all(pids: list[int]) -> None:
    """One SIGKILL to each, back to back, then wait until they are gone (bounded)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def get_json(url: str) -> dict | None:
    """The REST API's answer, or None when that node does not answer (it may be dead)."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # /primary and friends answer 503 with a body
        return json.loads(e.read() or b"null")
    except (OSError, ValueError):
        return None


def wait_until(what: str, probe, timeout_s: float, diagnose=lambda: ""):
    """``probe()`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} not within {timeout_s} s. {diagnose()}")


class Etcd:
    """One etcd member on loopback ports; Patroni talks to it over the v3 API."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.client_port = free_port()
        self.peer_port = free_port()
        self.log_path = folder / "etcd.log"
        self.process: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    ETCD, "--name", "etcd0", "--data-dir", str(self.folder / "etcd-data"),
                    "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"etcd0={peer}", "--initial-cluster-state", "new",
                    "--enable-v2=false",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        wait_until("etcd healthy", self.healthy, START_TIMEOUT_S, lambda: tail(self.log_path))

    def healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"etcd exited with {self.process.returncode}: {tail(self.log_path)}")
        answer = get_json(self.client_url + "/health")
        return bool(answer and answer.get("health") == "true")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)


@dataclass
class PatroniNode:
    """One PostgreSQL server and the Patroni that manages it: what a machine of the cluster holds."""

    folder: Path
    name: str
    port: int
    api_port: int
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def data_dir(self) -> Path:
        return self.folder / self.name / "data"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def config_path(self) -> Path:
        return self.folder / f"{self.name}.yml"

    @property
    def patroni_log(self) -> Path:
        return self.folder / f"{self.name}-patroni.log"

    @property
    def postgres_log(self) -> Path:
        return self.folder / f"{self.name}-postgresql.log"

    def url(self, database: str = "postgres") -> str:
        """This node alone (no target_session_attrs): to ask a standby, or to try writing to one."""
        return f"postgresql://postgres@{self.host_port}/{database}"

    def write_config(self, etcd: Etcd) -> None:
        self.config_path.write_text(json.dumps(patroni_config(self, etcd), indent=2))  # JSON is YAML
        if os.geteuid() == 0:
            shutil.chown(self.config_path, SYSTEM_USER, SYSTEM_USER)

    def start(self) -> None:
        """Starts Patroni (as the postgres user): it initdbs, clones, or rejoins by itself."""
        assert not self.running(), f"{self.name} already running"
        argv = [PATRONI, str(self.config_path)]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": str(self.folder)}
        with self.patroni_log.open("ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.starts += 1

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if alive(pid) else None

    def machine_pids(self) -> list[int]:
        """Patroni (under runuser), and the postmaster with its children: Patroni starts the
        postmaster in a session of its own, so it is not below Patroni in the process tree."""
        pids = []
        if self.running():
            pids += [self.process.pid, *descendants_of(self.process.pid)]
        postmaster = self.postmaster_pid()
        if postmaster is not None:
            pids += [postmaster, *descendants_of(postmaster)]
        return pids

    def kill(self) -> None:
        """The machine is lost: SIGKILL to Patroni, the postmaster and every child, all at once."""
        sigkill_all(self.machine_pids())
        if self.process is not None:
            self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM to Patroni stops PostgreSQL too; whatever is left after a bounded wait is killed."""
        if self.running():
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT_S)
        self.kill()

    def status(self) -> dict | None:
        """GET /patroni: this node's own view (role, state, timeline), None if it does not answer."""
        return get_json(self.api_url + "/patroni")

    def logs(self) -> str:
        return f"--- {self.name} patroni:\n{tail(self.patroni_log)}\n--- {self.name} postgresql:\n{tail(self.postgres_log)}"


def patroni_config(node: PatroniNode, etcd: Etcd) -> dict:
    return {
        "scope": SCOPE,
        "namespace": "/service/",
        "name": node.name,
        "log": {"level": "INFO"},
        "restapi": {"listen": f"127.0.0.1:{node.api_port}", "connect_address": f"127.0.0.1:{node.api_port}"},
        "etcd3": {"hosts": [f"127.0.0.1:{etcd.client_port}"]},
        "bootstrap": {
            "dcs": {
                "ttl": TTL_S,
                "loop_wait": LOOP_WAIT_S,
                "retry_timeout": RETRY_TIMEOUT_S,
                "maximum_lag_on_failover": 1024 * 1024,
                # Only the synchronous standby (named in etcd's /sync key) may be promoted, and a
                # commit is acknowledged once it is on that standby: a failover loses nothing
                # acknowledged. Not strict: with the standby gone the leader goes on alone rather
                # than blocking every write; then Patroni promotes nobody if that leader dies too
                # (no acknowledged write is lost, the cluster waits for it to come back). Strict
                # mode would also block all writes on the new leader right after a failover, until
                # the lost node rejoins, which is the opposite of carrying on.
                "synchronous_mode": True,
                "synchronous_mode_strict": False,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "wal_level": "replica",
                        "wal_log_hints": "on",  # pg_rewind needs it (or data checksums)
                        "hot_standby": "on",
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                        "max_connections": 100,
                        "synchronous_commit": "on",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}],
        },
        "postgresql": {
            "listen": node.host_port,
            "connect_address": node.host_port,
            "data_dir": str(node.data_dir),
            "bin_dir": str(PG_BIN),
            "pgpass": str(node.folder / f"{node.name}.pgpass"),
            "authentication": {
                "superuser": {"username": "postgres"},
                "replication": {"username": "postgres"},
                "rewind": {"username": "postgres"},
            },
            "pg_hba": [
                "local all all trust",
                "host all postgres 127.0.0.1/32 trust",
                "host replication postgres 127.0.0.1/32 trust",
            ],
            "parameters": {
                "unix_socket_directories": str(node.folder),
                "shared_buffers": "32MB",
                "fsync": "off",  # tests prove failover, not the disk; the sync standby still must ack
                "logging_collector": "on",
                "log_directory": str(node.folder),
                "log_filename": f"{node.name}-postgresql.log",
                "log_file_mode": "0644",
            },
        },
    }


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path.name} missing)"


class PatroniCluster:
    """etcd plus two Patroni nodes; one leader and one synchronous standby once started."""

    def __init__(self) -> None:
        self.folder = owned_folder("giftcard-patroni-")
        self.etcd = Etcd(self.folder)
        self.nodes = [PatroniNode(self.folder, name, free_port(), free_port()) for name in NODE_NAMES]

    def start(self) -> PatroniCluster:
        """etcd, then node1 (it wins the race to initialise), then node2 (a base backup of it);
        returns once there is a leader and a streaming synchronous standby."""
        self.etcd.start()
        for node in self.nodes:
            node.write_config(self.etcd)
        self.nodes[0].start()
        self.wait_for_leader()
        self.nodes[1].start()
        self.wait_for_sync_standby()
        return self

    # ---- what the REST API says --------------------------------------------------------------

    def members(self, exclude: PatroniNode | None = None) -> list[dict]:
        """GET /cluster from the first node that answers (skipping ``exclude``, e.g. a dead one)."""
        for node in self.nodes:
            if node is exclude:
                continue
            answer = get_json(node.api_url + "/cluster")
            if answer and "members" in answer:
                return answer["members"]
        return []

    def node_named(self, name: str) -> PatroniNode:
        return next(node for node in self.nodes if node.name == name)

    def leader_member(self, exclude: PatroniNode | None = None) -> dict | None:
        for member in self.members(exclude):
            if (
                member["role"] == "leader"
                and member["state"] == "running"
                and member["name"] != getattr(exclude, "name", None)
            ):
                return member
        return None

    def leader(self) -> PatroniNode:
        member = self.leader_member()
        assert member is not None, f"no leader: {self.members()}"
        return self.node_named(member["name"])

    def replica(self) -> PatroniNode:
        leader = self.leader()
        return next(node for node in self.nodes if node is not leader)

    def wait_for_leader(self, exclude: PatroniNode | None = None, timeout_s: float = START_TIMEOUT_S) -> PatroniNode:
        """A running leader other than ``exclude``, as the REST API reports it."""
        member = wait_until(
            "a running leader" + (f" other than {exclude.name}" if exclude else ""),
            lambda: self.leader_member(exclude),
            timeout_s,
            self.diagnose,
        )
        return self.node_named(member["name"])

    def wait_for_sync_standby(self, timeout_s: float = START_TIMEOUT_S) -> PatroniNode:
        """A member in role sync_standby that the leader's pg_stat_replication (as its /patroni
        reports it) shows streaming with sync_state 'sync'."""

        def sync_standby() -> dict | None:
            leader = self.leader_member()
            if leader is None:
                return None
            replication = (self.node_named(leader["name"]).status() or {}).get("replication") or []
            streaming_sync = {
                r["application_name"] for r in replication if (r["state"], r["sync_state"]) == ("streaming", "sync")
            }
            for member in self.members():
                if member["role"] == "sync_standby" and member["name"] in streaming_sync:
                    return member
            return None

        member = wait_until("a streaming synchronous standby", sync_standby, timeout_s, self.diagnose)
        return self.node_named(member["name"])

    # ---- what a client uses ------------------------------------------------------------------

    def url(self, database: str = "postgres", **query: str) -> str:
        """The multi-host URL the service is configured with: both nodes, the writable one found
        by asking each (``target_session_attrs=read-write``), whichever is leader now."""
        query = {"target_session_attrs": "read-write", **query}
        hosts = ",".join(node.host_port for node in self.nodes)
        return f"postgresql://postgres@{hosts}/{database}?{urlencode(query)}"

    # ---- faults ------------------------------------------------------------------------------

    def kill_leader(self) -> tuple[PatroniNode, float]:
        """SIGKILLs the leader's Patroni, postmaster and children at once; returns that node and
        the monotonic time of the kill."""
        leader = self.leader()
        pids = leader.machine_pids()
        killed_at = time.monotonic()
        sigkill_all(pids)
        if leader.process is not None:
            leader.process.wait(STOP_TIMEOUT_S)
        return leader, killed_at

    def restart_node(self, node: PatroniNode, timeout_s: float = REJOIN_TIMEOUT_S) -> None:
        """Starts a lost node's Patroni again: it sees another leader in etcd, rewinds its data
        (crash recovery first, then pg_rewind) and follows that leader."""
        node.start()

        def rejoined() -> bool:
            """A replica on the leader's timeline: before its rewind it runs, but on the old one."""
            members = {m["name"]: m for m in self.members()}
            leader = self.leader_member()
            member = members.get(node.name)
            return bool(
                leader
                and member
                and member["role"] in ("replica", "sync_standby")
                and member["state"] in ("running", "streaming")
                and member.get("timeline") == leader.get("timeline")
            )

        wait_until(f"{node.name} back as a replica", rejoined, timeout_s, self.diagnose)

    # ---- the end -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stops every node and etcd and removes the folder; each step runs even if one fails."""
        try:
            for node in self.nodes:
                try:
                    node.stop()
                except Exception:  # noqa: BLE001 - the next node and etcd must still be stopped
                    node.kill()
        finally:
            try:
                self.etcd.stop()
            finally:
                shutil.rmtree(self.folder, ignore_errors=True)

    def diagnose(self) -> str:
        """What the cluster looks like and the end of every log, for assertion messages."""
        return "\n".join(
            [f"members: {self.members()}", *(node.logs() for node in self.nodes), tail(self.etcd.log_path)]
        )
