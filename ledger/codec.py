"""How domain events become stored records: eventsourcing's Mapper, msgspec as the codec.

Event state is encoded as JSON with sorted keys, so the same event always has the
same bytes: those bytes are what the per-stream hash chain covers, and
re-encoding the ``data`` column read back from PostgreSQL gives them again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from eventsourcing.persistence import Mapper, Transcoder

_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder()


class MsgspecTranscoder(Transcoder):
    """JSON via msgspec. ``timestamp`` is the one field of our events that JSON has no type for."""

    def encode(self, obj: Any) -> bytes:
        return _encoder.encode(obj)

    def decode(self, data: bytes) -> Any:
        state = _decoder.decode(data)
        if isinstance(state, dict) and isinstance(state.get("timestamp"), str):
            state["timestamp"] = datetime.fromisoformat(state["timestamp"])
        return state


def canonical_json(data: bytes | str) -> bytes:
    """The canonical bytes of JSON text, whatever whitespace or key order it came in."""
    return _encoder.encode(_decoder.decode(data))


def new_mapper() -> Mapper:
    return Mapper(transcoder=MsgspecTranscoder())
