"""The output of a bulk issuance: the one file that ever holds its redemption codes in clear.

While a batch is being issued the rows go to ``OUTPUT.partial``, each chunk's rows appended,
flushed and fsynced *before* the chunk commits (see ``ledger.application.bulk_issue``); when every card
exists the file is renamed ``OUTPUT``. Every rewrite (dropping rows of chunks that never
committed, sorting) goes through a temporary file, fsynced and renamed over the old one, and
the directory is fsynced after each rename: a crash at any instant leaves either the old
rows or the new ones on disk, never a mix and never fewer committed codes.

A run holds an exclusive ``flock`` on ``OUTPUT.lock`` for its whole length, so two runs
naming the same output (two terminals, two generated batch ids) cannot interleave rows.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ledger.domain import errors

FILE_MODE = 0o600
COLUMNS = ("n", "cardId", "relationName", "redemptionCode", "value", "currencyCode", "expiringDate")


class CodesFileRefused(errors.Conflict):
    """The output cannot be used for this batch: another run holds it, or it is not ours."""

    code = "codes_file_refused"


@dataclass(frozen=True)
class CodeRow:
    """One card of the batch and its redemption code, as one line of the output."""

    n: int
    card_id: str
    relation_name: str
    redemption_code: str
    value: str  # major units, exact, as the wire writes them
    currency: str
    expiring_date: str  # ISO 8601, UTC

    def as_csv(self) -> tuple[str, ...]:
        return (
            str(self.n),
            self.card_id,
            self.relation_name,
            self.redemption_code,
            self.value,
            self.currency,
            self.expiring_date,
        )


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


# ---- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileContent:
    rows: list[CodeRow]
    torn: bool  # the last line was cut short: the file must be rewritten before anything is appended


def read_rows(path: Path) -> FileContent:
    """The rows of a codes file. A last line cut short is dropped: it was being written when the
    process died, so its fsync never returned and its chunk never committed."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    torn = bool(lines) and not lines[-1].endswith("\n")
    complete = lines[:-1] if torn else lines
    if not complete:
        return FileContent([], torn)  # at most a header cut short: nothing was ever committed after it
    header = next(csv.reader([complete[0]]))
    if tuple(header) != COLUMNS:
        raise CodesFileRefused(f"{path} is not a codes file of this tool (header {header!r})")
    rows: list[CodeRow] = []
    for number, line in enumerate(complete[1:], start=2):
        row = _parse_row(line)
        if row is None:
            raise CodesFileRefused(f"{path} line {number} is not a row of codes: {line[:80]!r}")
        rows.append(row)
    return FileContent(rows, torn)


def _parse_row(line: str) -> CodeRow | None:
    fields = next(csv.reader([line]), [])
    if len(fields) != len(COLUMNS) or not fields[0].isdigit():
        return None
    n, card_id, relation_name, code, value, currency, expiring = fields
    return CodeRow(int(n), card_id, relation_name, code, value, currency, expiring)


# ---- writing --------------------------------------------------------------------------------


def csv_text(rows: Iterable[CodeRow], *, header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(COLUMNS)
    writer.writerows(row.as_csv() for row in rows)
    return buffer.getvalue()


def replace_atomically(path: Path, rows: Iterable[CodeRow]) -> None:
    """``path`` holds exactly ``rows`` afterwards, or (after a crash) exactly what it held before."""
    temporary = path.with_name(path.name + ".tmp")
    with _open_private(temporary, os.O_TRUNC) as file:
        file.write(csv_text(rows, header=True))
        _sync(file)
    os.replace(temporary, path)
    sync_directory(path.parent)


def rename_durably(source: Path, target: Path) -> None:
    os.replace(source, target)
    sync_directory(target.parent)


def sync_directory(folder: Path) -> None:
    """A rename is durable only once the directory holding it is flushed too."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _open_private(path: Path, mode_flag: int) -> IO[str]:
    """Codes are money: their files are readable by their owner only (0600), whatever the umask."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | mode_flag, FILE_MODE)
    return open(descriptor, "w" if mode_flag == os.O_TRUNC else "a", encoding="utf-8", newline="")


def _sync(file: IO[str]) -> None:
    file.flush()
    os.fsync(file.fileno())


class Appender:
    """Appends rows to the partial file; ``append`` returns once they are on disk."""

    def __init__(self, path: Path) -> None:
        fresh = not path.exists() or path.stat().st_size == 0
        self.file = _open_private(path, os.O_APPEND)
        if fresh:
            self.file.write(csv_text((), header=True))
            _sync(self.file)
            sync_directory(path.parent)  # the file's own name must survive a crash, too

    def append(self, rows: Iterable[CodeRow]) -> None:
        self.file.write(csv_text(rows, header=False))
        _sync(self.file)

    def close(self) -> None:
        self.file.close()


# ---- one run at a time per output ---------------------------------------------------------------


@contextlib.contextmanager
def exclusive(output: Path) -> Iterator[None]:
    """Holds ``OUTPUT.lock`` for the run; refuses at once (never waits) when another run holds it."""
    path = lock_path(output)
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CodesFileRefused(f"another run is writing {output} (it holds {path})") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # the lock file lives only as long as the run
    finally:
        os.close(descriptor)
