"""Outbound events (webhooks): ledger events delivered to subscribers as signed JSON POSTs.

What the rest of the hub uses: ``run_deliveries(pool, settings, stop)``, the background deliverer,
on a pool from ``create_delivery_pool(database_url)``.
``/api/webhooks`` is ``hub.http.webhooks_api``; ``giftcard webhooks ...`` is ``hub.cli.webhooks``.
Modules: ``events`` (the public payloads), ``signing`` (the signature headers), ``storage`` (all the
SQL), ``subscriptions`` (creation rules, the secret), ``delivery`` (the deliverer) and ``wire`` (the
API's request bodies).
"""

from hub.webhooks.delivery import DeliveryOptions, create_delivery_pool, run_deliveries

__all__ = ["DeliveryOptions", "create_delivery_pool", "run_deliveries"]
