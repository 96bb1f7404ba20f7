"""Closing the month over a large generated ledger: each ``giftcard finance`` report timed.

The ledger is ``bench.projections_perf``'s (genuine cards decided by the aggregate, about 20 events
each, spread over 2026). Each report runs as ``python -m hub.cli finance ...`` in a subprocess, as
an operator runs it, and is timed with its peak resident set (memory should stay flat: one card
at a time). The target: every report over 1M events in under 30 s.

    python -m bench.finance_close [--events 1000000 | --quick] [--database-url URL] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.projections_perf import EVENTS_DEFAULT, EVENTS_QUICK, bench_database, cli, write_ledger
from bench.report import write_json
from ledger.postgres.database import create_pool

TARGET_S = 30
PERIOD = ("--from", "2026-06-01", "--to", "2026-06-30")


def reports(tmp: Path) -> dict[str, list[str]]:
    return {
        "rollforward": ["finance", "rollforward", *PERIOD, "--json", str(tmp / "rollforward.json")],
        "journal": ["finance", "journal", *PERIOD, "--format", "csv", "--output", str(tmp / "journal.csv")],
        "breakage": ["finance", "breakage", "--as-of", "2026-12-31", "--json", str(tmp / "breakage.json")],
        "dormant": ["finance", "dormant", "--as-of", "2026-12-31", "--years", "1"],
        "export liabilities (for comparison)": ["export", "liabilities", "--as-of", "2026-06-30"],
    }


async def seed(url: str, events: int) -> dict[str, Any]:
    pool = await create_pool(url, size_min=1, size_max=4)
    try:
        started = time.perf_counter()
        written = await write_ledger(pool, events)
        seconds = time.perf_counter() - started
        await pool.execute("vacuum analyze events")
    finally:
        await pool.close()
    return {"events": written, "write_s": round(seconds, 1)}


def measure(url: str, events: int) -> dict[str, Any]:
    figures = {}
    with tempfile.TemporaryDirectory(prefix="giftcard-close-") as tmp:
        for name, args in reports(Path(tmp)).items():
            seconds, peak_kib, _, code = cli(url, *args)
            if code != 0:
                raise RuntimeError(f"{name} exited {code}")
            figures[name] = {
                "seconds": round(seconds, 2),
                "events_per_s": events / seconds,
                "peak_rss_mb": peak_kib / 1024,
            }
            print(f"  {name}: {seconds:.1f} s, peak {peak_kib / 1024:.0f} MB", file=sys.stderr, flush=True)
    return figures


def table(figures: dict[str, Any]) -> str:
    lines = ["| report | seconds | events/s | peak RSS | target |", "|---|---|---|---|---|"]
    for name, f in figures["reports"].items():
        verdict = "met" if f["seconds"] < TARGET_S else "MISSED"
        lines.append(
            f"| {name} | {f['seconds']} | {f['events_per_s']:,.0f} | {f['peak_rss_mb']:,.0f} MB | < {TARGET_S} s: {verdict} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.finance_close", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=EVENTS_DEFAULT, help="events to write (%(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"{EVENTS_QUICK:,} events")
    parser.add_argument("--database-url", help="server to use (default: $GIFTCARD_DATABASE_URL or embedded)")
    parser.add_argument("--keep", action="store_true", help="keep the bench database afterwards")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    args.citus = False
    if args.quick:
        args.events = EVENTS_QUICK
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with bench_database(args) as url:
        seeded = asyncio.run(seed(url, args.events))
        print(f"{seeded['events']:,} events written in {seeded['write_s']} s", file=sys.stderr, flush=True)
        figures = {
            "benchmark": "finance_close",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            **seeded,
            "reports": measure(url, seeded["events"]),
        }
    print(table(figures))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
