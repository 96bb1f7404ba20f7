"""``giftcard bench``: the benchmark suite. The only way product code reaches ``bench/``.

Offered only where ``bench/`` is installed (a source checkout): the container image leaves it out,
with the baselines it needs (``.[bench]``), so its ``giftcard`` has no command that cannot run.
"""

from __future__ import annotations

import argparse
import importlib.util


def add_commands(commands: argparse._SubParsersAction) -> None:
    if importlib.util.find_spec("bench") is None:
        return
    bench = commands.add_parser(
        "bench", help="the benchmark suite side by side (raw PostgreSQL, stock eventsourcing, this service)"
    )
    bench.add_argument("--quick", action="store_true", help="a smoke run, under three minutes")
    bench.add_argument("--json", metavar="FILE", help="write every figure and ratio here")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from bench import suite  # the benchmarks and their baselines load only when asked for

    return suite.main([*(["--quick"] if args.quick else []), *(["--json", args.json] if args.json else [])])
