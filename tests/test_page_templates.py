"""The auditor's pages' templates (hub/pages/templates, hub/pages/rendering.py): every one autoescapes, a variable a
template names but was not given is an error, and data stays text in element content and attributes alike."""

from __future__ import annotations

import jinja2
import pytest

from hub.pages import rendering
from hub.pages.charts import ChartPoint, line_chart
from tests import page_dom

HOSTILE = "\"'><script>alert(1)</script><img src=x onerror=alert(2)>"


def test_every_template_compiles_and_autoescapes():
    assert rendering.ENVIRONMENT.autoescape is True  # not a choice by file name: .j2 would escape nothing
    names = rendering.ENVIRONMENT.list_templates()
    assert {"base.html.j2", "overview.html.j2", "card.html.j2", "error.html.j2", "chart.svg.j2"} <= set(names)
    for name in names:
        rendering.ENVIRONMENT.get_template(name)  # a syntax error would raise here


def test_a_missing_variable_is_an_error_not_an_empty_string():
    with pytest.raises(jinja2.UndefinedError):
        rendering.render("error.html.j2", heading="Not found", replica_lag=None)  # no message


def test_data_stays_text_in_content_and_attributes():
    chart = line_chart(
        [ChartPoint(100, HOSTILE, HOSTILE), ChartPoint(250, "b", "b")],
        currency="USD",
        title=HOSTILE,
        value_title="Balance",
        order_title=HOSTILE,
        step=True,
        chart_id=HOSTILE,
    )
    svg = rendering.ENVIRONMENT.get_template("chart.svg.j2").module.line_chart(chart)
    document = page_dom.parse(str(svg))
    assert not document.find_all(lambda n: n.tag in ("script", "img"))
    assert document.find_all(lambda n: n.tag == "svg")[0].attrs["id"] == HOSTILE  # the attribute held it whole
    assert document.find_all(lambda n: n.tag == "figcaption")[0].text() == HOSTILE
    assert [p.attrs["data-value"] for p in page_dom.chart_points(document, HOSTILE)] == ["1.00", "2.50"]
