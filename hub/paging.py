"""``REST-Range`` as VTEX sends it (``resources=0-49``) and as other clients do (``0-49``)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from ledger.domain.errors import InvalidRequest

PAGE_ITEMS_DEFAULT = 50
PAGE_ITEMS_MAX = 1000
_RANGE = re.compile(r"^\s*(?:resources\s*=\s*)?(\d{1,9})\s*-\s*(\d{1,9})\s*$")


class RestRange(NamedTuple):
    start: int
    end: int  # inclusive, as in the header

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def parse_rest_range(header: str | None) -> RestRange:
    if header is None or not header.strip():
        return RestRange(0, PAGE_ITEMS_DEFAULT - 1)
    match = _RANGE.match(header)
    if not match:
        raise InvalidRequest(f"REST-Range must look like 'resources=0-49' or '0-49', got {header!r}")
    start, end = int(match[1]), int(match[2])
    if end < start:
        raise InvalidRequest(f"REST-Range ends before it starts: {header!r}")
    if end - start + 1 > PAGE_ITEMS_MAX:
        raise InvalidRequest(f"REST-Range asks for more than {PAGE_ITEMS_MAX} items")
    return RestRange(start, end)


def page_of(items: list[Any], window: RestRange) -> list[Any]:
    return items[window.start : window.end + 1]


def unranged_means_whole(header: str | None, items: list[Any]) -> tuple[list[Any], dict[str, str]]:
    """A page of a list that VTEX's specs do not page (a card's transactions): a caller that sends no
    ``REST-Range`` (VTEX's own hub, which was never told to) gets the whole list, never a silent
    first 50; one that sends it gets that page. Both are told the total."""
    unranged = header is None or not header.strip()
    window = RestRange(0, max(len(items), 1) - 1) if unranged else parse_rest_range(header)
    page = page_of(items, window)
    return page, content_range(window, len(page), len(items))


def content_range(window: RestRange, shown: int, total: int) -> dict[str, str]:
    last = window.start + shown - 1 if shown else window.start
    return {"REST-Content-Range": f"resources {window.start}-{last}/{total}"}
