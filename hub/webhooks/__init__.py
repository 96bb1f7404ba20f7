"""Outbound events (webhooks): ledger events delivered to subscribers as signed JSON POSTs.

What the rest of the hub uses: ``routes()`` (``/api/webhooks``), ``add_commands(subparsers)``
(``giftcard webhooks ...``) and ``run_deliveries(pool, settings, stop)``, the background
deliverer. Modules: ``events`` (the public payloads), ``signing`` (the signature header),
``storage`` (all the SQL), ``subscriptions`` (creation rules, the secret), ``delivery`` (the
deliverer), ``api`` and ``cli``.
"""

from hub.webhooks.api import routes
from hub.webhooks.cli import add_commands
from hub.webhooks.delivery import DeliveryOptions, run_deliveries, run_in_serve

__all__ = ["DeliveryOptions", "add_commands", "routes", "run_deliveries", "run_in_serve"]
