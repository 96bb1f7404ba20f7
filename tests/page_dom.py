"""A tiny DOM of an HTML page (ours as served, or Chromium's --dump-dom), to read the numbers a page
shows: rows marked ``data-row``, cells marked ``data-field``, chart points, by plain attributes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        if self.tag == "br":
            return "\n"
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def find_all(self, match: Callable[[Node], bool]) -> list[Node]:
        return [node for node in self.walk() if match(node)]

    def by_id(self, element_id: str) -> Node | None:
        return next((n for n in self.walk() if n.attrs.get("id") == element_id), None)

    def fields(self) -> dict[str, str]:
        """The text of each descendant with ``data-field``, by that name (whitespace collapsed)."""
        return {n.attrs["data-field"]: " ".join(n.text().split()) for n in self.walk() if "data-field" in n.attrs}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):  # close up to the matching open element
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root


def rows(document: Node, kind: str) -> list[Node]:
    return document.find_all(lambda n: n.tag == "tr" and n.attrs.get("data-row") == kind)


def chart_points(document: Node, chart_id: str) -> list[Node]:
    chart = document.by_id(chart_id)
    assert chart is not None, f"no chart {chart_id}"
    return chart.find_all(lambda n: n.tag == "circle" and "point" in n.attrs.get("class", "").split())


def polyline_points(document: Node, chart_id: str) -> list[tuple[float, float]]:
    chart = document.by_id(chart_id)
    assert chart is not None, f"no chart {chart_id}"
    line = next(n for n in chart.walk() if n.tag == "polyline")
    return [tuple(float(v) for v in pair.split(",")) for pair in line.attrs["points"].split()]
