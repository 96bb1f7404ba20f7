"""Calls the hub forwarded to external providers, seen as money movements by exports and audit.

The same rules as the ``transaction_history`` read model: only a call the provider answered
"ok" moved money; its amount is exact in 10^-4 units (the card's currency is not recorded);
a create-transaction names no transaction id of the provider's (the call's own stream stands
in for it), a settlement or cancellation names the provider's transaction but no oid (again
the call's stream stands in). A create-transaction the hub forwarded again with the same
``requestId`` got the original back from the provider: only the first one counts.
"""

from __future__ import annotations

from typing import NamedTuple

from ledger.eventstore.store import RecordedEvent
from projections import events as ev
from projections.audit.replay import CANCELLATION, SETTLEMENT, TRANSACTION

# Forwarded create-transactions that repeat an earlier one (same provider, card and requestId, the
# requestId trimmed as the read model trims it), in commit order: these are not counted again.
# One window over the forwarded events (PostgreSQL sorts, spilling to disk if it must).
FORWARDED_REPLAYS_CTE = """
forwarded_replays as (
    select position from (
        select position,
               row_number() over (
                   partition by data->>'providerId', data->>'cardId', btrim(data->>'requestId', E' \\t\\n\\r\\f\\v')
                   order by seq, source) as nth
        from events
        where type = 'ProviderCallForwarded'
          and data->>'operation' = 'CreateGiftCardTransaction'
          and data->>'outcome' = 'ok'
          and data->>'cardId' is not null
          and btrim(coalesce(data->>'requestId', ''), E' \\t\\n\\r\\f\\v') <> ''
    ) ranked
    where nth > 1
)
"""


class ForwardedMove(NamedTuple):
    provider: str
    card_id: str
    transaction_id: str
    oid: str | None
    kind: str  # transaction, settlement, cancellation
    amount: int  # 10^-4 units of a currency the hub does not record
    request_id: str | None


def forwarded_move(event: RecordedEvent) -> ForwardedMove | None:
    """The money a forwarded call moved, or None if it moved none the hub can state exactly.

    Raises msgspec's DecodeError/ValidationError when the event is not a forwarded call at all.
    """
    call = ev.decode(event, ev.Forwarded)
    if not ev.forwarded_money(call) or call.operation == ev.FORWARDED_CREATE_CARD:
        return None
    amount = ev.forwarded_amount(call.value)
    if amount is None or call.card_id is None:
        return None
    if call.operation == ev.FORWARDED_CREATE_TRANSACTION:
        request_id = (call.request_id or "").strip() or None
        transaction_id = call.transaction_id or event.stream_id
        return ForwardedMove(call.provider_id, call.card_id, transaction_id, None, TRANSACTION, amount, request_id)
    if call.transaction_id is None:
        return None
    kind = SETTLEMENT if call.operation == ev.FORWARDED_SETTLE else CANCELLATION
    return ForwardedMove(
        call.provider_id, call.card_id, call.transaction_id, event.stream_id, kind, amount, call.request_id
    )
