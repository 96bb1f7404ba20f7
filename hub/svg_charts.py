"""Charts of money as inline SVG, drawn on the server.

They need no script and no CDN, print as they show, and carry their numbers: every point is a
``circle.point`` with ``data-value`` (the exact decimal it stands for) and a ``<title>`` that a
pointer shows. Values are integer minor units of one currency, so the scale and its labels are
exact too; one chart holds one currency, since amounts in different currencies share no scale.

Points are spaced evenly, in order: a card's events (several often share one instant: an issue and
its first load, a debit and its settlement) each get a place of their own, in line with the
timeline's rows; the days of a liability series are consecutive, so even spacing is their time
scale. The axis labels name the points they stand under (a version and its date, or a day).
"""

from __future__ import annotations

from dataclasses import dataclass

from hub.markup import Markup, amount_text, fill, join
from ledger.money import exponent_of

WIDTH_PX, HEIGHT_PX = 960, 300
LEFT_PX, RIGHT_PX, TOP_PX, BOTTOM_PX = 92, 32, 16, 56  # room for the axes' labels and titles
Y_TICKS_WANTED = 5
X_TICKS_MAX = 6
POINT_RADIUS_PX = 4
POINTS_MARKED_MAX = 60  # beyond this many, markers would merge into a band: they stay, hoverable but unpainted


@dataclass(frozen=True)
class ChartPoint:
    minor: int  # the value, in minor units of the chart's currency
    tick: str  # what the time axis says under this point, if it gets a tick
    label: str  # what the point's tooltip says


@dataclass(frozen=True)
class _Scale:
    """Maps point indices and minor units onto the plot area."""

    count: int
    low: int  # the value axis, in minor units: low..high, both ticks
    high: int

    def x(self, index: int) -> float:
        width = WIDTH_PX - LEFT_PX - RIGHT_PX
        if self.count == 1:
            return LEFT_PX + width / 2
        return LEFT_PX + index * width / (self.count - 1)

    def y(self, minor: int) -> float:
        share = (minor - self.low) / (self.high - self.low)
        return HEIGHT_PX - BOTTOM_PX - share * (HEIGHT_PX - TOP_PX - BOTTOM_PX)


def line_chart(
    points: list[ChartPoint],
    *,
    currency: str,
    title: str,
    value_title: str,
    order_title: str,
    step: bool,
    chart_id: str,
) -> Markup:
    """A line through ``points`` (in order) with labelled axes; ``step`` holds each value until the
    next point, as a balance does between events. Empty when there is nothing to draw."""
    if not points:
        return Markup("")
    ticks = value_ticks([p.minor for p in points], currency)
    scale = _Scale(len(points), ticks[0], ticks[-1])
    line = _line_points(points, scale, step)
    parts = [
        _value_axis(ticks, scale, currency),
        _order_axis(points, scale),
        fill(
            '<text class="axis-title" transform="translate(16 {y:.0f}) rotate(-90)" text-anchor="middle">{t}</text>',
            y=(TOP_PX + HEIGHT_PX - BOTTOM_PX) / 2,
            t=f"{value_title} ({currency})",
        ),
        fill(
            '<text class="axis-title" x="{x:.0f}" y="{y}" text-anchor="middle">{t}</text>',
            x=(LEFT_PX + WIDTH_PX - RIGHT_PX) / 2,
            y=HEIGHT_PX - 8,
            t=order_title,
        ),
        _area(line, scale),
        fill('<polyline class="series" points="{p}"/>', p=_coordinates(line)),
        _markers(points, scale, currency),
    ]
    return fill(
        '<figure class="chart"><figcaption id="{id}-title">{title}</figcaption>'
        '<svg class="chart" id="{id}" role="img" aria-labelledby="{id}-title" viewBox="0 0 {w} {h}" '
        'data-points="{n}" data-currency="{currency}">{parts}</svg></figure>',
        id=chart_id,
        title=title,
        w=WIDTH_PX,
        h=HEIGHT_PX,
        n=len(points),
        currency=currency,
        parts=join(parts),
    )


def value_ticks(values: list[int], currency: str) -> list[int]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten, in minor units) spanning ``values`` and zero."""
    low, high = min(0, *values), max(0, *values)
    if low == high:
        high = 10 ** exponent_of(currency)  # one major unit: a flat line at zero still gets a scale
    raw_step = -(-(high - low) // (Y_TICKS_WANTED - 1))  # ceiling division: integers, no float rounding
    magnitude = 10 ** (len(str(raw_step)) - 1)
    halves = (2, 4, 5, 10, 20)  # 1, 2, 2.5, 5, 10 times the magnitude, where that is a whole minor unit
    step = next(h * magnitude // 2 for h in halves if h * magnitude % 2 == 0 and h * magnitude // 2 >= raw_step)
    first, last = (low // step) * step, -(-high // step) * step
    return list(range(first, last + step, step))


def order_ticks(count: int) -> list[int]:
    """Up to ``X_TICKS_MAX`` indices spread evenly from the first point to the last."""
    if count <= X_TICKS_MAX:
        return list(range(count))
    return sorted({round(i * (count - 1) / (X_TICKS_MAX - 1)) for i in range(X_TICKS_MAX)})


def _line_points(points: list[ChartPoint], scale: _Scale, step: bool) -> list[tuple[float, float]]:
    line: list[tuple[float, float]] = []
    for index, point in enumerate(points):
        x = scale.x(index)
        if step and index > 0:
            line.append((x, scale.y(points[index - 1].minor)))  # the value held until this point
        line.append((x, scale.y(point.minor)))
    return line


def _coordinates(line: list[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in line)


def _area(line: list[tuple[float, float]], scale: _Scale) -> Markup:
    baseline = scale.y(0)
    outline = [(line[0][0], baseline), *line, (line[-1][0], baseline)]
    return fill('<polygon class="area" points="{p}"/>', p=_coordinates(outline))


def _value_axis(ticks: list[int], scale: _Scale, currency: str) -> Markup:
    rows = [
        fill(
            '<line x1="{l}" x2="{r}" y1="{y:.1f}" y2="{y:.1f}"/>'
            '<text x="{tx}" y="{ty:.1f}" text-anchor="end">{label}</text>',
            l=LEFT_PX,
            r=WIDTH_PX - RIGHT_PX,
            y=scale.y(tick),
            tx=LEFT_PX - 8,
            ty=scale.y(tick) + 4,
            label=amount_text(tick, currency),
        )
        for tick in ticks
    ]
    return fill('<g class="grid">{rows}</g>', rows=join(rows))


def _order_axis(points: list[ChartPoint], scale: _Scale) -> Markup:
    indices = order_ticks(len(points))
    labels = [
        fill(
            '<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y2}"/>'
            '<text x="{x:.1f}" y="{ty}" text-anchor="{anchor}">{label}</text>',
            x=scale.x(index),
            y=HEIGHT_PX - BOTTOM_PX,
            y2=HEIGHT_PX - BOTTOM_PX + 5,
            ty=HEIGHT_PX - BOTTOM_PX + 20,
            anchor=_anchor(index, len(points)),
            label=points[index].tick,
        )
        for index in indices
    ]
    baseline = fill(
        '<line x1="{l}" x2="{r}" y1="{y}" y2="{y}"/>', l=LEFT_PX, r=WIDTH_PX - RIGHT_PX, y=HEIGHT_PX - BOTTOM_PX
    )
    return fill('<g class="axis">{baseline}{labels}</g>', baseline=baseline, labels=join(labels))


def _anchor(index: int, count: int) -> str:
    """The first and last labels lean inwards, so that neither runs off the chart."""
    if count == 1:
        return "middle"
    return "start" if index == 0 else "end" if index == count - 1 else "middle"


def _markers(points: list[ChartPoint], scale: _Scale, currency: str) -> Markup:
    quiet = " quiet" if len(points) > POINTS_MARKED_MAX else ""
    circles = [
        fill(
            '<circle class="point{quiet}" cx="{x:.1f}" cy="{y:.1f}" r="{r}" data-value="{value}">'
            "<title>{label}</title></circle>",
            quiet=Markup(quiet),
            x=scale.x(index),
            y=scale.y(point.minor),
            r=POINT_RADIUS_PX,
            value=amount_text(point.minor, currency).replace(",", ""),
            label=point.label,
        )
        for index, point in enumerate(points)
    ]
    return fill('<g class="points">{circles}</g>', circles=join(circles))
