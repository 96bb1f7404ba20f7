"""Reading PostgreSQL's EXPLAIN (FORMAT JSON) plans in tests."""

from __future__ import annotations


def rows_examined(plan: dict) -> float:
    """Rows of events the plan's scans read: those they returned and those a filter dropped (row-level
    security's among them); EXPLAIN gives both per loop."""
    own = 0.0
    if plan.get("Relation Name") == "events":
        read = (
            plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0) + plan.get("Rows Removed by Index Recheck", 0)
        )
        own = read * plan["Actual Loops"]
    return own + sum(rows_examined(child) for child in plan.get("Plans", []))


def indexes_used(plan: dict) -> set[str]:
    own = {plan["Index Name"]} if "Index Name" in plan else set()
    return own.union(*(indexes_used(child) for child in plan.get("Plans", [])))
