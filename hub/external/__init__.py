"""The external provider client: how the hub speaks to other providers.

``client`` (one provider over the Gift Card Provider Protocol, every call recorded as an event),
``breaker`` (its circuit breaker), ``directory`` (a client per registered provider, kept fresh) and
``egress`` (where any outbound request may go; the webhooks' deliverer obeys it too).
"""
