"""How domain events become stored records: eventsourcing's Mapper, msgspec as the codec.

Event state is encoded as JSON with sorted keys, so the same event always has the
same bytes: those bytes are what the per-stream hash chain covers, and
re-encoding the ``data`` column read back from PostgreSQL gives them again.
"""

from __future__ import annotations

from collections.abc import Callable
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
        return _timestamp_parsed(_decoder.decode(data))


class SealingTranscoder(MsgspecTranscoder):
    """Personal fields are sealed (ledger.personal_data) before the bytes are made: the hash chain
    covers their ciphertext, never their clear text."""

    def __init__(self, seal: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self._seal = seal

    def encode(self, obj: Any) -> bytes:
        return _encoder.encode(self._seal(obj))


class DecodedTranscoder(MsgspecTranscoder):
    """For a reader that has decoded each event's state already (to re-derive its canonical bytes):
    the Mapper is handed that state in place of the bytes, so no event is decoded twice."""

    def decode(self, data: Any) -> Any:
        # A copy: the Mapper adds its own keys to the event state it is given, which the reader keeps.
        return _timestamp_parsed(dict(data) if isinstance(data, dict) else data)


def _timestamp_parsed(state: Any) -> Any:
    if isinstance(state, dict) and isinstance(state.get("timestamp"), str):
        state["timestamp"] = datetime.fromisoformat(state["timestamp"])
    return state


def canonical_json(data: bytes | str) -> bytes:
    """The canonical bytes of JSON text, whatever whitespace or key order it came in."""
    return decode_canonical(data)[1]


def decode_canonical(data: bytes | str) -> tuple[Any, bytes]:
    """JSON text decoded, and its canonical bytes (as ``canonical_json``) encoded from that one decode."""
    state = _decoder.decode(data)
    return state, _encoder.encode(state)


def new_mapper(seal: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Mapper:
    """``seal``: what replaces an event's personal fields before it is encoded (see SealingTranscoder)."""
    return Mapper(transcoder=MsgspecTranscoder() if seal is None else SealingTranscoder(seal))


def new_decoded_mapper() -> Mapper:
    """A Mapper whose stored events carry their state decoded (see ``DecodedTranscoder``)."""
    return Mapper(transcoder=DecodedTranscoder())
