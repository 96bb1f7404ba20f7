"""Command-line options that several benchmarks spell the same way."""

from __future__ import annotations

import argparse
import os


def add_database_url(parser: argparse.ArgumentParser, what: str) -> None:
    """``--database-url``: ``what`` says what the benchmark does with the server. Unset (None), the
    benchmark starts an embedded one (see ``bench.event_store_appends.database_server``)."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("GIFTCARD_DATABASE_URL"),
        help=f"{what}; default $GIFTCARD_DATABASE_URL, else an embedded server in a temporary directory",
    )


def int_list(text: str) -> list[int]:
    """An argument type: comma-separated whole numbers (``1,8,32``)."""
    return [int(n) for n in text.split(",")]
