"""A card's whole state at one version, so that a long history loads in one read.

Snapshots are a cache of the events, never a source of truth: ``audit verify``
replays from the first event and compares the whole state.

The snapshot's fields are derived from the card's own (``CardState``'s annotations and the
aggregate's id, version and times), so an attribute added to the card is carried with no edit
here, and a card holding an attribute it does not declare cannot be snapshotted at all (an
error, never a silent loss). The stored form carries its ``SNAPSHOT_SCHEMA``; one of an older
schema is *stale*: it is discarded, and the card is rebuilt from its events (``decode_snapshot``
answers None), since events are what a card is and replaying them is always right.
Schema 1, before the tag, held the same fields copied by hand.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_type_hints
from uuid import UUID

import msgspec

from ledger.domain.giftcard import CardState, GiftCard

SNAPSHOT_SCHEMA = 2  # raise it whenever CardState changes: snapshots taken before it are then stale

# The aggregate's own attributes (eventsourcing's, stored with a leading underscore), then the card's.
_AGGREGATE_FIELDS: list[tuple[str, Any]] = [
    ("id", UUID),
    ("version", int),
    ("created_on", datetime),
    ("modified_on", datetime),
]
_CARD_FIELDS = list(get_type_hints(CardState).items())
_NOT_STATE = "_pending_events"  # events not yet saved: never part of a snapshot

# Every field required and none unknown, the schema a literal: a snapshot of any other shape fails
# to decode rather than restore a card with an attribute missing or left over.
CardSnapshot = msgspec.defstruct(
    "CardSnapshot",
    [("schema", Literal[SNAPSHOT_SCHEMA]), *_AGGREGATE_FIELDS, *_CARD_FIELDS],
    kw_only=True,
    forbid_unknown_fields=True,
)
_STATE_NAMES = frozenset(
    [f"_{name}" for name, _ in _AGGREGATE_FIELDS] + [name for name, _ in _CARD_FIELDS] + [_NOT_STATE]
)


class _Schema(msgspec.Struct):
    schema: int = 1  # schema 1 had no tag


class SnapshotIncomplete(Exception):
    """The card holds attributes its snapshot would not carry: declare them on ``CardState``."""


# MessagePack: the state of a long-lived card is large, and binary decodes several times faster.
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CardSnapshot)
_schema_decoder = msgspec.msgpack.Decoder(_Schema)


def take_snapshot(card: GiftCard) -> bytes:
    state = vars(card)
    undeclared = state.keys() - _STATE_NAMES
    if undeclared:
        raise SnapshotIncomplete(f"card attributes not declared on CardState: {', '.join(sorted(undeclared))}")
    fields = {name.lstrip("_"): value for name, value in state.items() if name != _NOT_STATE}
    return _encoder.encode(CardSnapshot(schema=SNAPSHOT_SCHEMA, **fields))


def decode_snapshot(data: bytes) -> Any:
    """The snapshot's state (a ``CardSnapshot``); None when it is stale (an older schema). Raises
    ``msgspec.MsgspecError`` when it is no snapshot of any schema."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError:
        if _schema_decoder.decode(data).schema < SNAPSHOT_SCHEMA:
            return None
        raise


def restore_snapshot(data: bytes) -> GiftCard | None:
    """The card a snapshot holds; None when it is stale (see ``decode_snapshot``)."""
    snapshot = decode_snapshot(data)
    if snapshot is None:
        return None
    card = object.__new__(GiftCard)
    state = msgspec.structs.asdict(snapshot)
    del state["schema"]
    for name, _ in _AGGREGATE_FIELDS:
        state[f"_{name}"] = state.pop(name)
    state[_NOT_STATE] = []
    card.__dict__.update(state)
    return card
