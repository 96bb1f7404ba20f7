"""Rows into records: a Struct or dataclass whose fields are named as the columns it is read from."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import asyncpg
import msgspec.inspect

T = TypeVar("T")


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in msgspec.inspect.type_info(cls).fields)


def from_row(cls: type[T], row: asyncpg.Record, **fields: Any) -> T:
    """``cls`` (a msgspec Struct or a dataclass), each field read from the row's column of the same
    name, but for ``fields``: those whose column is decoded, named otherwise or not selected."""
    columns = {name: row[name] for name in _field_names(cls) if name not in fields}
    return cls(**columns, **fields)
