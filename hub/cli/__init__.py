"""The ``giftcard`` command line: every subcommand, one module each, each a thin call into the
layer that does the work (``ledger``, ``projections``, ``hub.webhooks``, ``hub.http.auth``, ``hub.app``).

``serve``, ``db``, ``keys``, ``demo``, ``bench``, ``projections`` (the read models), ``finance``
(``audit`` and ``export``), ``webhooks``, ``batches`` (``cards issue``) and ``privacy`` each add their commands
with ``add_commands``. ``python -m hub.cli`` is the same as ``giftcard``.
"""

from __future__ import annotations

import argparse

from hub.cli import batches, bench, db, demo, finance, keys, privacy, projections, serve, webhooks
from hub.logs import configure_logging

COMMAND_MODULES = (serve, db, demo, bench, keys, projections, finance, webhooks, batches, privacy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="giftcard", description="Gift card hub and event-sourced native provider")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    return args.run(args)
