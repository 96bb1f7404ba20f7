"""The HTTP surfaces: one module per surface, and what they share.

Surfaces: ``native`` (the native provider's Gift Card Provider Protocol and its Gift Card API),
``hub_api`` (the Hub API over every provider), ``read_api`` (the read models), ``audit_api``,
``bulk_api`` (batches) and ``webhooks_api``. Shared: ``state`` (the application's typed keys),
``auth``, ``paging``, ``throttle`` (failed code lookups), ``read_pool`` (replica or primary) and
``openapi``. ``hub.app`` assembles them with the auditor's pages into one application.
"""
