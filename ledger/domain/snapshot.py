"""A card's whole state at one version, so that a long history loads in one read.

Snapshots are a cache of the events, never a source of truth: ``audit verify``
replays from the first event and compares.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from ledger.domain.giftcard import GiftCard, IdempotencyRecord, Transaction


class CardSnapshot(msgspec.Struct, kw_only=True):
    id: UUID
    version: int
    created_on: datetime
    modified_on: datetime
    relation_name: str
    caption: str
    profile_id: str
    currency: str
    emission_date: datetime
    expiring_date: datetime
    restricted_to_owner: bool
    multiple_credits: bool
    multiple_redemptions: bool
    code_tail: str
    issued_at: datetime
    balance: int
    transactions: dict[str, Transaction]
    request_ids: dict[str, IdempotencyRecord]


# MessagePack: the state of a long-lived card is large, and binary decodes several times faster.
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CardSnapshot)


def take_snapshot(card: GiftCard) -> bytes:
    state = {name.lstrip("_"): value for name, value in vars(card).items() if name != "_pending_events"}
    return _encoder.encode(msgspec.convert(state, CardSnapshot, from_attributes=True))


def decode_snapshot(data: bytes) -> CardSnapshot:
    return _decoder.decode(data)


def restore_snapshot(data: bytes) -> GiftCard:
    snapshot = decode_snapshot(data)
    card = object.__new__(GiftCard)
    state = msgspec.structs.asdict(snapshot)
    for name in ("id", "version", "created_on", "modified_on"):
        state[f"_{name}"] = state.pop(name)
    state["_pending_events"] = []
    card.__dict__.update(state)
    return card
