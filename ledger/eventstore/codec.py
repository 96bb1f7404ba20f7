"""How domain events become stored records: eventsourcing's Mapper, msgspec as the codec.

Event state is encoded as JSON with sorted keys, so the same event always has the
same bytes: those bytes are what the per-stream hash chain covers, and
re-encoding the ``data`` column read back from PostgreSQL gives them again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder

_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder()


class MsgspecTranscoder(Transcoder):
    """Encodes an event's state as canonical JSON. Decoding is the reader's: every stored event is
    decoded once, as its canonical bytes are re-derived for the hash chain (``decode_canonical``,
    in ledger.eventstore.store.recorded_event), and the Mapper is handed that decoded state, not bytes."""

    def encode(self, obj: Any) -> bytes:
        return _encoder.encode(obj)

    def decode(self, data: Any) -> Any:
        # A copy: the Mapper adds its own keys to the state it is given, which the reader keeps.
        return _timestamp_parsed(dict(data) if isinstance(data, dict) else data)


class SealingTranscoder(MsgspecTranscoder):
    """Personal fields are sealed (ledger.postgres.personal_data) before the bytes are made: the hash
    chain covers their ciphertext, never their clear text."""

    def __init__(self, seal: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self._seal = seal

    def encode(self, obj: Any) -> bytes:
        return _encoder.encode(self._seal(obj))


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


_reader = new_mapper()


def domain_event(stream_id: UUID, version: int, stored_type: str, state: Any) -> Any:
    """The domain event a stored one holds, from its data decoded once (see ``MsgspecTranscoder``);
    ``stored_type`` resolves whichever release wrote it (see ledger.domain.topics)."""
    return _reader.to_domain_event(
        StoredEvent(originator_id=stream_id, originator_version=version, topic=stored_type, state=state)
    )
