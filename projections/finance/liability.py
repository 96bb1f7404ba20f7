"""What a card owes at an instant: the one definition ``export liabilities`` and the roll-forward share.

A Debit's hold counts as redeemed: the card's available balance already excludes it, as the
protocol has it (a Debit lowers the balance at once), and a release gives it back. A card that
has expired owes nothing: its value left the liability at the expiry instant (as breakage or as
unclaimed property, see ``config``). The domain's rule for "expired" is used as it is (``now >
expiringDate``), so the card is still owed at its expiry instant and not after it.
"""

from __future__ import annotations

from datetime import datetime

from ledger.domain.giftcard import GiftCard


def card_liability(card: GiftCard | None, at: datetime) -> int:
    """Minor units ``card`` (as replayed up to ``at``) owes at ``at``; 0 before it was issued."""
    if card is None or card.is_expired(at):
        return 0
    return card.balance
