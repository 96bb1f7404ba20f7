"""Outbound events (webhooks): ledger events delivered to subscribers as signed JSON POSTs.

What the rest of the hub uses: ``add_commands(subparsers)`` (``giftcard webhooks ...``) and
``run_deliveries(pool, settings, stop)``, the background deliverer; ``/api/webhooks`` is
``hub.http.webhooks_api``. Modules: ``events`` (the public payloads), ``signing`` (the signature
header), ``storage`` (all the SQL), ``subscriptions`` (creation rules, the secret), ``delivery``
(the deliverer), ``wire`` (the API's request bodies) and ``cli``.
"""

from hub.webhooks.cli import add_commands
from hub.webhooks.delivery import DeliveryOptions, run_deliveries, run_in_serve

__all__ = ["DeliveryOptions", "add_commands", "run_deliveries", "run_in_serve"]
