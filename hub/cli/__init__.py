"""The ``giftcard`` command line: every subcommand, one module each, each a thin call into the
layer that does the work (``ledger``, ``projections``, ``hub.webhooks``, ``hub.http.auth``, ``hub.app``).

``serve``, ``db``, ``keys``, ``tenants``, ``demo``, ``bench``, ``projections`` (the read models), ``finance``
(``audit`` and ``export``), ``close`` (the ``finance`` group: closing the month), ``webhooks``,
``batches`` (``cards issue``) and ``privacy`` each add their commands
with ``add_commands``. ``python -m hub.cli`` is the same as ``giftcard``.

The settings are read once, after the arguments (so ``--help`` and ``--version`` work whatever the
environment holds) and before any command starts: a bad one ends the run with one line naming it
and exit 2. Each command finds them as ``args.settings``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version

from hub.cli import batches, bench, close, db, demo, finance, keys, privacy, projections, serve, tenants, webhooks
from hub.config import SettingRefused, Settings, parse_database_url
from hub.logs import configure_logging

COMMAND_MODULES = (serve, db, demo, bench, keys, tenants, projections, finance, close, webhooks, batches, privacy)
LOG_LEVELS = ("debug", "info", "warning", "error")
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="giftcard", description="Gift card hub and event-sourced native provider")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('giftcard-hub')}")
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="the least severe log lines written (default info)"
    )
    parser.add_argument(
        "--database-url",
        type=_database_url,
        help="the PostgreSQL to use (default: GIFTCARD_DATABASE_URL, else the embedded one)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.settings = settings_of(args)
    except SettingRefused as e:
        print(f"giftcard: {e}", file=sys.stderr)
        return EXIT_USAGE
    # Lines for a person on a terminal; JSON, one object per line, for a log collector.
    configure_logging(getattr(logging, args.log_level.upper()), readable=sys.stderr.isatty())
    return args.run(args)


def settings_of(args: argparse.Namespace) -> Settings:
    """The environment's settings, with what the command line says instead where it says it."""
    overrides = {} if args.database_url is None else {"database_url": args.database_url}
    return Settings.from_env(**overrides)


def _database_url(value: str) -> str:
    try:
        return parse_database_url(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a PostgreSQL URL ({e})") from None
