"""Closing the month: roll-forward, journal, breakage and dormancy, derived from the card events.

Every figure comes from one walk of the card streams (``walk``), in which each card is replayed
through the domain and each change of what it owes is a ``Movement`` naming the event behind it.
What a card owes at an instant is defined once, in ``liability``, and ``export liabilities``
uses the same definition. The expiry policy and the chart of accounts come from a small TOML file
(``config``).
"""
