"""The auditor's web pages: server-rendered HTML, no script, charts as inline SVG.

``audit`` (the routes under ``/audit`` and the figures they show), ``card`` (one card's page),
``charts`` (where a chart's points and labels go), ``rendering`` (the Jinja2 environment and the
text forms of amounts and instants) and ``templates/`` (the HTML, SVG and CSS).
"""
