"""Real PostgreSQL 15 servers from Debian's binaries, on free loopback ports, for replication tests.

A ``PgNode`` is one server in a temporary folder, run as the ``postgres`` system user (the
binaries refuse root). ``ReplicatedPair`` is a primary with one synchronous streaming standby, the
setup the README's "High availability" section asks for. Tests may SIGKILL the primary (the
postmaster and every child, as losing the machine would) and promote the standby. Whatever a
test starts it stops, also when it fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path(os.environ.get("GIFTCARD_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SYSTEM_USER = "postgres"
START_TIMEOUT_S = 60
STANDBY_NAME = "standby"


def pg_binaries_missing() -> str | None:
    """Why these tests cannot run here, or None."""
    if not (PG_BIN / "postgres").exists():
        return f"PostgreSQL 15 server binaries not found in {PG_BIN} (Debian package postgresql-15)"
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        return f"no {SYSTEM_USER!r} system user to run PostgreSQL as"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != SYSTEM_USER:
        return f"starting servers as {SYSTEM_USER!r} needs root or that user"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def as_postgres(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def owned_folder(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        shutil.chown(folder, SYSTEM_USER, SYSTEM_USER)
    return folder


class PgNode:
    """One PostgreSQL server; ``settings`` go into its postgresql.conf."""

    def __init__(self, folder: Path, name: str, port: int | None = None) -> None:
        self.folder = folder
        self.name = name
        self.port = port or free_port()
        self.pgdata = folder / name

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host_port}/{database}"

    def initdb(self, **settings: str) -> None:
        as_postgres([str(PG_BIN / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "-A", "trust", "-E", "UTF8"])
        with (self.pgdata / "pg_hba.conf").open("a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        defaults = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.folder}'",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "wal_log_hints": "on",  # lets pg_rewind bring a failed primary back as a standby
            "fsync": "off",  # tests prove replication, not the disk; the sync standby still must ack
            "shared_buffers": "32MB",
        }
        self.configure(**{**defaults, **settings})

    def configure(self, **settings: str) -> None:
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    def base_backup_from(self, primary: PgNode) -> None:
        """A streaming standby of ``primary`` (``pg_basebackup -R``), named for synchronous replication."""
        as_postgres(
            [
                str(PG_BIN / "pg_basebackup"),
                "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                "-D", str(self.pgdata), "-R", "-X", "stream", "-c", "fast",
            ]
        )  # fmt: skip
        self.configure(port=str(self.port), unix_socket_directories=f"'{self.folder}'")
        # After -R's own line in postgresql.auto.conf, which wins over postgresql.conf: the standby's name.
        conninfo = f"host=127.0.0.1 port={primary.port} user=postgres application_name={self.name}"
        with (self.pgdata / "postgresql.auto.conf").open("a") as auto:
            auto.write(f"primary_conninfo = '{conninfo}'\n")

    def base_backup_to(self, destination: Path) -> None:
        """A base backup of this server into ``destination``, without WAL: restoring it needs the archive."""
        as_postgres(
            [
                str(PG_BIN / "pg_basebackup"),
                "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                "-D", str(destination), "-X", "none", "-c", "fast",
            ]
        )  # fmt: skip

    def restore_from(self, base_backup: Path, archive: Path, target_time: str) -> None:
        """This node's data folder a copy of ``base_backup``, set to replay the archive up to
        ``target_time`` and then be promoted (it archives nothing itself: the archive is the original's)."""
        as_postgres(["cp", "-a", str(base_backup), str(self.pgdata)])
        self.configure(
            port=str(self.port),
            unix_socket_directories=f"'{self.folder}'",
            archive_mode="off",
            **restore_settings(archive, target_time),
        )
        as_postgres(["touch", str(self.pgdata / "recovery.signal")])

    def start(self) -> None:
        as_postgres(
            [
                str(PG_BIN / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.folder / f"{self.name}.log"),
                "-o", f"-p {self.port}", "-w", "-t", str(START_TIMEOUT_S), "start",
            ],
            timeout=START_TIMEOUT_S * 2,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        if self.postmaster_pid() is None:
            return
        try:
            as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop"], timeout=60)
        except subprocess.CalledProcessError:
            self.kill()

    def promote(self) -> None:
        as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.pgdata), "-w", "promote"], timeout=60)

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def kill(self) -> float:
        """SIGKILL the postmaster and every child at once: the machine is gone, nothing shuts down.
        Returns the monotonic time the last signal was sent."""
        pid = self.postmaster_pid()
        if pid is None:
            return time.monotonic()
        family = [pid, *children_of(pid)]
        for member in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + 10
        while any(alive(member) for member in family) and time.monotonic() < deadline:
            time.sleep(0.01)
        return killed_at

    def sql(self, *statements: str) -> None:
        """Runs statements as the superuser through psql (for set-up steps, not for tests' assertions)."""
        self.sql_in("postgres", *statements)

    def sql_in(self, database: str, *statements: str) -> None:
        argv = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-X", "-q"]
        for statement in statements:
            argv += ["-c", statement]
        as_postgres([*argv, "-v", "ON_ERROR_STOP=1", database])

    def log_text(self) -> str:
        path = self.folder / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def archive_settings(archive: Path) -> dict[str, str]:
    """postgresql.conf settings that copy each finished WAL segment into ``archive``, never overwriting one."""
    return {"archive_mode": "on", "archive_command": f"'test ! -f {archive}/%f && cp %p {archive}/%f'"}


def restore_settings(archive: Path, target_time: str) -> dict[str, str]:
    """Point-in-time recovery from ``archive``: replay up to ``target_time``, then promote."""
    return {
        "restore_command": f"'cp {archive}/%f %p'",
        "recovery_target_time": f"'{target_time}'",
        "recovery_target_action": "'promote'",
    }


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


class ReplicatedPair:
    """A primary and its synchronous standby (``synchronous_standby_names = '*'``)."""

    def __init__(self, *, synchronous: bool = True) -> None:
        self.folder = owned_folder("giftcard-pair-")
        self.primary = PgNode(self.folder, "node1")
        self.standby = PgNode(self.folder, "node2")
        self.synchronous = synchronous

    def start(self) -> ReplicatedPair:
        self.primary.initdb(
            port=str(self.primary.port),
            synchronous_standby_names="'*'" if self.synchronous else "''",
            synchronous_commit="on",
        )
        self.primary.start()
        self.standby.base_backup_from(self.primary)
        self.standby.start()
        return self

    def url(self, database: str = "postgres", **query: str) -> str:
        """The multi-host URL an operator would configure: every node, the primary found by asking."""
        query = {"target_session_attrs": "read-write", **query}
        hosts = ",".join(node.host_port for node in (self.primary, self.standby))
        return f"postgresql://postgres@{hosts}/{database}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def fail_over(self) -> float:
        """The primary's machine dies; the standby is promoted (what Patroni automates).

        The promoted node inherited ``synchronous_standby_names = '*'`` and has no standby of its
        own: left so, every commit would wait for one forever. As Patroni does when no synchronous
        candidate is left (``synchronous_mode`` without ``strict``), it runs unreplicated until a
        standby is attached again. Returns the monotonic time the primary was killed.
        """
        killed_at = self.primary.kill()
        self.standby.promote()
        self.standby.sql("alter system set synchronous_standby_names = ''", "select pg_reload_conf()")
        return killed_at

    def stop(self) -> None:
        for node in (self.primary, self.standby):
            node.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
