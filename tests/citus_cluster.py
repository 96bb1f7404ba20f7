"""A Citus cluster on loopback ports: a coordinator and two workers, each a PostgreSQL 15 server
from Debian's binaries with the Citus extension that ``../shared/citus/build`` installs.

Started as the README of that folder shows (initdb, ``shared_preload_libraries = 'citus'``,
``CREATE EXTENSION citus`` in the database on every node, ``citus_set_coordinator_host`` and
``citus_add_node`` on the coordinator); everything started is stopped, also when a test fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.pg_cluster import PG_BIN, PgNode, owned_folder, pg_binaries_missing

CITUS_LIBRARY = PG_BIN.parent / "lib" / "citus.so"
WORKERS = 2


def citus_missing() -> str | None:
    """Why a Citus cluster cannot start here, or None."""
    missing = pg_binaries_missing()
    if missing:
        return missing
    if not CITUS_LIBRARY.exists():
        return f"Citus is not installed ({CITUS_LIBRARY} missing): run ../shared/citus/build as root"
    return None


class CitusCluster:
    """``database`` exists on every node with the extension; the coordinator knows its workers."""

    def __init__(self, database: str = "giftcard", workers: int = WORKERS) -> None:
        self.folder: Path = owned_folder("giftcard-citus-")
        self.database = database
        self.coordinator = PgNode(self.folder, "coordinator")
        self.workers = [PgNode(self.folder, f"worker{n}") for n in range(1, workers + 1)]

    @property
    def nodes(self) -> list[PgNode]:
        return [self.coordinator, *self.workers]

    def start(self) -> CitusCluster:
        for node in self.nodes:
            self._start_node(node)
        self.coordinator.sql_in(
            self.database,
            f"select citus_set_coordinator_host('127.0.0.1', {self.coordinator.port})",
            *(f"select citus_add_node('127.0.0.1', {worker.port})" for worker in self.workers),
        )
        return self

    def start_another_worker(self) -> PgNode:
        """A node ready to be a worker, not yet registered with the coordinator (that is the test's)."""
        node = PgNode(self.folder, f"worker{len(self.workers) + 1}")
        self.workers.append(node)  # stopped with the others
        self._start_node(node)
        return node

    def _start_node(self, node: PgNode) -> None:
        node.initdb(
            port=str(node.port),
            shared_preload_libraries="'citus'",
            max_connections="200",  # the coordinator opens connections to every worker per session
            max_prepared_transactions="100",  # Citus commits multi-node transactions in two phases
            wal_level="logical",  # shard moves copy through logical replication
            **{"citus.shard_count": "8"},  # (default 32) fewer shards: each test's moves take seconds, not minutes
        )
        node.start()
        node.sql(f"create database {self.database}")
        node.sql_in(self.database, "create extension citus")

    def url(self, database: str | None = None) -> str:
        return self.coordinator.url(database or self.database)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
