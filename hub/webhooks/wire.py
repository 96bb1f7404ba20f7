"""Request bodies of ``/api/webhooks`` (msgspec Structs, decoded once at the edge)."""

from __future__ import annotations

from typing import Annotated

import msgspec


class CreateWebhookRequest(msgspec.Struct, rename="camel"):
    url: str
    events: list[str] | None = None  # absent: every event type, including ones added later
    description: str | None = None


class ReplayWebhookRequest(msgspec.Struct, rename="camel"):
    from_position: Annotated[int, msgspec.Meta(ge=0)]
