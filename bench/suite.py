"""``giftcard bench``: the whole suite in one run, side by side, in one table.

Each benchmark in ``bench/`` measures this service against baselines on the same machine and
database in the same run, so ratios mean something on a noisy machine where absolute figures
do not:

- event store appends: the raw PostgreSQL ceiling and the stock eventsourcing peer;
- HTTP Debit authorizations (wrk): the conventional eventsourcing path and the lean UPDATE;
- loading a card with 10,000 transactions: snapshot + tail against a full replay.

``--quick`` is a smoke run under three minutes; ``--json FILE`` writes every figure and ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import card_load, event_store_appends, http_debits
from bench.event_store_appends import database_server
from bench.report import write_json


def appends_args(quick: bool, database_url: str | None) -> list[str]:
    args = ["--writers", "1,64", "--quick"] if quick else []
    return [*args, *(["--database-url", database_url] if database_url else [])]


def http_args(quick: bool, database_url: str | None) -> list[str]:
    args = ["--connections", "64", "--quick"] if quick else []
    return [*args, *(["--database-url", database_url] if database_url else [])]


def card_load_args(quick: bool, database_url: str | None) -> list[str]:
    args = ["--transactions", "2000", "--loads", "5"] if quick else []
    return [*args, *(["--database-url", database_url] if database_url else [])]


def run_one(name: str, main: Callable[[list[str]], int], argv: list[str], folder: Path) -> dict[str, Any]:
    """Runs one benchmark's own ``main`` and reads back the JSON it wrote; a skip is reported, not raised."""
    output = folder / f"{name}.json"
    print(f"== {name}: python -m bench.{name} {' '.join(argv)}", file=sys.stderr, flush=True)
    try:
        main([*argv, "--json", str(output)])
    except SystemExit as e:  # a benchmark that cannot run here says why (e.g. no wrk) and exits
        if e.code not in (0, None):
            return {"skipped": str(e.code)}
    except Exception as e:  # one broken benchmark must not cost the figures of the others
        return {"skipped": f"failed: {type(e).__name__}: {e}"}
    return json.loads(output.read_text()) if output.exists() else {"skipped": "no figures written"}


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, baseline, ours, ratio) for the one table."""
    table = []
    for r in figures["event_store_appends"].get("results", []):
        table.append(
            (
                f"appends/s, {r['writers']} writers",
                f"raw INSERT {r['raw_insert_per_s']:,}",
                f"{r['our_append_per_s']:,}",
                f"{r['ours_vs_raw_pct']} % of raw",
            )
        )
        table.append(
            (
                f"appends/s, {r['writers']} writers",
                f"eventsourcing {r['eventsourcing_per_s']:,}",
                f"{r['our_append_per_s']:,}",
                f"{r['ours_vs_eventsourcing_x']} x",
            )
        )
    cells = {(c["server"], c["connections"]): c for c in figures["http_debits"].get("results", [])}
    for (server, connections), cell in sorted(cells.items()):
        if server != "ours":
            continue
        for baseline in ("conventional", "lean"):
            base = cells.get((baseline, connections))
            if base is not None:
                table.append(
                    (
                        f"HTTP Debits/s, {connections} conns (p99 ms)",
                        f"{baseline} {base['requests_per_s']:,.0f} ({base['p99_ms']:.0f})",
                        f"{cell['requests_per_s']:,.0f} ({cell['p99_ms']:.0f})",
                        f"{cell['requests_per_s'] / base['requests_per_s']:.2f} x",
                    )
                )
    load = figures["card_load"]
    if "snapshot_load_ms_median" in load:
        table.append(
            (
                f"load a {load['transactions']:,}-transaction card, ms",
                f"full replay {load['full_replay_ms_median']}",
                f"{load['snapshot_load_ms_median']}",
                f"{load['speedup']} x faster",
            )
        )
    return table  # fmt: skip


def render(table: list[tuple[str, str, str, str]], figures: dict[str, Any]) -> str:
    header = ("measure", "baseline (same run)", "this service", "ratio")
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(4)]
    lines = [" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(header))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in table]
    skipped = [
        f"{name}: skipped ({f['skipped']})"
        for name, f in figures.items()
        if isinstance(f, dict) and isinstance(f.get("skipped"), str)  # http_debits lists skipped servers
    ]
    return "\n".join(lines + skipped)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="giftcard bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, under three minutes")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure and ratio here")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("GIFTCARD_DATABASE_URL"),
        help="PostgreSQL server to measure on (default $GIFTCARD_DATABASE_URL, else an embedded one)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick}
    # One server for every benchmark: the configured one, or one embedded for the whole run.
    with database_server(args.database_url) as server_url, tempfile.TemporaryDirectory(prefix="giftcard-suite-") as tmp:
        args.database_url = server_url
        folder = Path(tmp)
        figures["event_store_appends"] = run_one(
            "event_store_appends", event_store_appends.main, appends_args(args.quick, args.database_url), folder
        )
        if shutil.which("wrk"):
            figures["http_debits"] = run_one(
                "http_debits", http_debits.main, http_args(args.quick, args.database_url), folder
            )
        else:
            figures["http_debits"] = {"skipped": "wrk is not installed (apt-get install -y wrk)"}
        figures["card_load"] = run_one(
            "card_load", card_load.main, card_load_args(args.quick, args.database_url), folder
        )
    table = rows(figures)
    figures["table"] = [dict(zip(("measure", "baseline", "ours", "ratio"), row, strict=True)) for row in table]
    print(render(table, figures))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
