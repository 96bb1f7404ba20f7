"""Charts of money as inline SVG, drawn on the server.

They need no script and no CDN, print as they show, and carry their numbers: every point is a
``circle.point`` with ``data-value`` (the exact decimal it stands for) and a ``<title>`` that a
pointer shows. Values are integer minor units of one currency, so the scale and its labels are
exact too; one chart holds one currency, since amounts in different currencies share no scale.

Points are spaced evenly, in order: a card's events (several often share one instant: an issue and
its first load, a debit and its settlement) each get a place of their own, in line with the
timeline's rows; the days of a liability series are consecutive, so even spacing is their time
scale. The axis labels name the points they stand under (a version and its date, or a day).

This module only computes where things go (``LineChart``); ``templates/chart.svg.j2`` writes the SVG.
"""

from __future__ import annotations

from dataclasses import dataclass

from hub.pages.rendering import amount_text
from ledger.domain.money import exponent_of

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
class Frame:
    """The plot area's edges in the SVG's own pixels (its viewBox); the axes' labels go outside it."""

    width: int = WIDTH_PX
    height: int = HEIGHT_PX
    left: int = LEFT_PX
    right: int = WIDTH_PX - RIGHT_PX
    top: int = TOP_PX
    bottom: int = HEIGHT_PX - BOTTOM_PX
    point_radius: int = POINT_RADIUS_PX


@dataclass(frozen=True)
class ValueTick:
    y: float
    label: str


@dataclass(frozen=True)
class OrderTick:
    x: float
    label: str
    anchor: str  # the SVG text-anchor


@dataclass(frozen=True)
class Marker:
    x: float
    y: float
    value: str  # the exact decimal, ungrouped, for data-value
    label: str


@dataclass(frozen=True)
class LineChart:
    """Everything ``chart.svg.j2`` draws, placed."""

    chart_id: str
    title: str
    currency: str
    value_title: str
    order_title: str
    value_ticks: list[ValueTick]
    order_ticks: list[OrderTick]
    area: str  # SVG points of the filled area under the line
    line: str  # SVG points of the line
    markers: list[Marker]
    quiet: bool  # too many points to paint each marker
    frame: Frame = Frame()


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
) -> LineChart | None:
    """A line through ``points`` (in order) with labelled axes; ``step`` holds each value until the
    next point, as a balance does between events. None when there is nothing to draw."""
    if not points:
        return None
    ticks = value_ticks([p.minor for p in points], currency)
    scale = _Scale(len(points), ticks[0], ticks[-1])
    line = _line_points(points, scale, step)
    return LineChart(
        chart_id=chart_id,
        title=title,
        currency=currency,
        value_title=f"{value_title} ({currency})",
        order_title=order_title,
        value_ticks=[ValueTick(scale.y(tick), amount_text(tick, currency)) for tick in ticks],
        order_ticks=_order_ticks(points, scale),
        area=_coordinates(_area(line, scale)),
        line=_coordinates(line),
        markers=_markers(points, scale, currency),
        quiet=len(points) > POINTS_MARKED_MAX,
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


def _area(line: list[tuple[float, float]], scale: _Scale) -> list[tuple[float, float]]:
    """The line closed along the zero line, so that the area under it can be filled."""
    baseline = scale.y(0)
    return [(line[0][0], baseline), *line, (line[-1][0], baseline)]


def _order_ticks(points: list[ChartPoint], scale: _Scale) -> list[OrderTick]:
    count = len(points)
    return [OrderTick(scale.x(index), points[index].tick, _anchor(index, count)) for index in order_ticks(count)]


def _anchor(index: int, count: int) -> str:
    """The first and last labels lean inwards, so that neither runs off the chart."""
    if count == 1:
        return "middle"
    return "start" if index == 0 else "end" if index == count - 1 else "middle"


def _markers(points: list[ChartPoint], scale: _Scale, currency: str) -> list[Marker]:
    return [
        Marker(
            scale.x(index),
            scale.y(point.minor),
            amount_text(point.minor, currency).replace(",", ""),
            point.label,
        )
        for index, point in enumerate(points)
    ]
