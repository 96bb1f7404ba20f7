"""The stored names of the card's events, and the names earlier releases stored them under.

A stored event's ``type`` (and an Issued event's ``originator_topic``) names the class that
applies it. These names are stable: they say what happened (``giftcard.Debited``), not where a
class lives, so moving or renaming a module never strands an event already written. Rows written
before the names were stable carry module paths; ``LEGACY_TOPICS`` keeps them loadable. A stored
type is never rewritten (events are immutable and the hash chain covers it), so a database
written by an older release holds both spellings, and readers match on ``event_name``.
"""

from __future__ import annotations

from eventsourcing.utils import register_topic, resolve_topic

CARD_PREFIX = "giftcard."  # of the card's name and of every card event's, including any added later
CARD = CARD_PREFIX + "GiftCard"
ISSUED = CARD_PREFIX + "Issued"
CREDITED = CARD_PREFIX + "Credited"
DEBITED = CARD_PREFIX + "Debited"
SETTLED = CARD_PREFIX + "Settled"
CANCELLED = CARD_PREFIX + "Cancelled"
VOIDED = CARD_PREFIX + "Voided"
CARD_EVENTS = (ISSUED, CREDITED, DEBITED, SETTLED, CANCELLED, VOIDED)

# What releases before the stable names stored, to the stable name each means. Never remove an
# entry: some database somewhere holds rows under it.
_MODULE_PATH = "ledger.domain.giftcard:GiftCard"
LEGACY_TOPICS = {
    _MODULE_PATH: CARD,
    **{f"{_MODULE_PATH}.{name.removeprefix(CARD_PREFIX)}": name for name in CARD_EVENTS},
}


def register_legacy_topics() -> None:
    """Makes every legacy topic resolve to the class its stable name is registered for. Called
    once the card's classes are defined (they register their stable names themselves)."""
    for legacy, name in LEGACY_TOPICS.items():
        register_topic(legacy, resolve_topic(name))


def event_name(stored_type: str) -> str:
    """The stable name of a stored event's type, whichever release wrote it."""
    return LEGACY_TOPICS.get(stored_type, stored_type)


def stored_types(*names: str) -> list[str]:
    """Every ``type`` a row of any of ``names`` may carry, for a query that filters on it."""
    return [*names, *(legacy for legacy, name in LEGACY_TOPICS.items() if name in names)]
