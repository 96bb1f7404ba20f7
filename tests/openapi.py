"""Validate decoded JSON bodies against the three VTEX gift card OpenAPI specs.

The spec files live beside the checkout in ``../shared/spec`` and are never copied into the
project; every helper here skips the calling test, with the reason, when that folder is absent.

Usage from a test::

    from tests.openapi import validate_request, validate_response

    validate_response("provider", "GetGiftCardbyID", 200, await response.json())
    validate_request("hub", "CreateGiftCardTransaction", body)

``spec_name`` is ``"provider"``, ``"hub"`` or ``"native"`` (or the file name, with or without
``.json``). A mismatch raises :class:`SpecViolation`, an ``AssertionError`` listing every error.

Schemas are the spec's own, with local ``$ref``s inlined and OpenAPI 3.0 ``nullable`` turned into
JSON Schema, checked with a Draft 4 validator (OpenAPI 3.0's schema dialect is Draft 4 based).
Unknown properties are allowed, as in the specs. The only departures from the files are listed
in :data:`DEVIATIONS`, each with the NOTES.md reason.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "spec"

SPEC_FILES = {
    "provider": "gift-card-provider-protocol.json",
    "hub": "gift-card-hub-api.json",
    "native": "gift-card-api.json",
}

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")

# Keys of an OpenAPI 3.0 Schema Object that mean nothing to a validator (or mean something else in
# JSON Schema); dropping them keeps error messages about the body, not about the documentation.
_DOC_ONLY_KEYS = frozenset({"example", "examples", "deprecated", "readOnly", "writeOnly", "xml", "externalDocs"})

# How many characters of an offending body a SpecViolation message quotes.
_BODY_QUOTE_CHARS = 600


class SpecViolation(AssertionError):
    """A body does not match the schema the spec documents for it."""


# --------------------------------------------------------------------------------------------
# Locating and loading the spec files


def spec_dir() -> Path:
    """The folder holding the three OpenAPI files (it may not exist)."""
    return SPEC_DIR


def require_spec() -> Path:
    """Return :func:`spec_dir`, or skip the calling test (or module) when the specs are absent."""
    missing = [name for name in SPEC_FILES.values() if not (SPEC_DIR / name).is_file()]
    if missing:
        pytest.skip(
            f"VTEX OpenAPI specs not found in {SPEC_DIR} (missing {', '.join(missing)}); they live beside "
            "the checkout in ../shared/spec and are deliberately not copied into the project",
            allow_module_level=True,
        )
    return SPEC_DIR


# Use as a decorator or ``pytestmark = requires_spec`` to skip before the test even starts.
requires_spec = pytest.mark.skipif(
    not all((SPEC_DIR / name).is_file() for name in SPEC_FILES.values()),
    reason=f"VTEX OpenAPI specs not found in {SPEC_DIR} (../shared/spec beside the checkout)",
)


def spec_key(spec_name: str) -> str:
    """Normalise ``"provider"``, ``"gift-card-provider-protocol"`` or ``"...json"`` to a key."""
    if spec_name in SPEC_FILES:
        return spec_name
    for key, file_name in SPEC_FILES.items():
        if spec_name in (file_name, file_name.removesuffix(".json")):
            return key
    raise KeyError(f"unknown spec {spec_name!r}; use one of {sorted(SPEC_FILES)} or their file names")


def load_spec(spec_name: str) -> dict[str, Any]:
    """The spec exactly as published (a fresh deep copy, so callers may mutate it)."""
    return copy.deepcopy(_raw_spec(spec_key(spec_name)))


@functools.cache
def _raw_spec(key: str) -> dict[str, Any]:
    path = require_spec() / SPEC_FILES[key]
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Tolerated deviations


@dataclass(frozen=True)
class Deviation:
    """One documented place where we validate against something other than the published file."""

    spec: str  # a key of SPEC_FILES
    pointer: str  # RFC 6901 JSON pointer into the published document
    patch: Callable[[Any], Any]  # old schema at `pointer` -> schema used instead
    reason: str  # why, citing /work/shared/spec/NOTES.md


# Cart totals, item prices, discounts and price-tag values are money. They travel as decimals in
# major units (140.0, 5.92) although some schemas type them `integer`. Counts stay integers.
AMOUNT_FIELDS = frozenset(
    {"grandTotal", "discounts", "shipping", "taxes", "itemsTotal", "price", "shippingDiscount", "value"}
)
_INTEGER_AMOUNT_SCHEMAS = {
    "provider": ("Cart", "Item", "Cart1", "Item1", "Cart2", "Item2", "PriceTag"),
    "hub": ("Cart", "Item", "Cart1", "Item1", "Cart2"),
    "native": ("Cart", "Item", "Cart1", "Item2", "PriceTag"),
}

_HUB_TRANSACTION = "/paths/~1api~1giftcardproviders~1{giftCardProviderId}~1giftcards~1{giftCardId}~1transactions"
_HUB_PROVIDER = "/paths/~1api~1giftcardproviders~1{giftCardProviderId}"
_JSON_200 = "/responses/200/content/application~1json/schema"


def widen_integer_amounts(schema: Any) -> Any:
    """Retype `integer` money fields (names in AMOUNT_FIELDS) as `number`, recursing into nesting."""
    if isinstance(schema, list):
        return [widen_integer_amounts(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    widened = {key: widen_integer_amounts(value) for key, value in schema.items()}
    for name, prop in widened.get("properties", {}).items():
        if name in AMOUNT_FIELDS and isinstance(prop, dict) and prop.get("type") == "integer":
            widened["properties"][name] = {**prop, "type": "number"}
    return widened


def _one_or_many(array_schema: dict) -> dict:
    return {"anyOf": [array_schema, array_schema["items"]]}


def _price_tags_as_array(object_schema: dict) -> dict:
    return {"type": "array", "items": object_schema}


def _self_as_object(_old: Any) -> dict:
    return {"type": "object", "properties": {"href": {"type": "string"}}}


def _also_transactions_key(response_schema: dict) -> dict:
    properties = response_schema["properties"]
    return {**response_schema, "properties": {**properties, "transactions": properties["transaction"]}}


def _nullable(prop: dict) -> dict:
    return {**prop, "nullable": True}


def _required_on_items(array_schema: dict) -> dict:
    patched = {key: value for key, value in array_schema.items() if key != "required"}
    patched["items"] = {**array_schema["items"], "required": array_schema["required"]}
    return patched


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        "hub",
        _HUB_TRANSACTION + "~1{tId}~1settlements/post" + _JSON_200,
        _one_or_many,
        "NOTES 8.1: the Hub spec types the settle response as an array of {oid,value,date}; the "
        "Provider and native APIs return one object. A Hub may answer either; each element is still checked.",
    ),
    Deviation(
        "hub",
        "/components/schemas/Item1/properties/priceTags",
        _price_tags_as_array,
        "NOTES 8.2 and 3.5: the Hub spec types orderInfo.cart.items[].priceTags as one object; that is a "
        "spec bug, it is an array of {name,value} in the Provider and native specs and on the wire.",
    ),
    *(
        Deviation(
            "hub",
            _HUB_PROVIDER + f"/{method}" + _JSON_200 + "/properties/_self",
            _self_as_object,
            "NOTES 8.3 and 5.1: provider `_self` on Hub GET/PUT was typed as an array (the file keeps a stray "
            "`items`); the examples and the list operation use an object {href}, so check it as that object.",
        )
        for method in ("get", "put")
    ),
    Deviation(
        "hub",
        "/paths/~1api~1giftcardproviders~1{giftCardProviderId}~1giftcards/post" + _JSON_200,
        _also_transactions_key,
        "NOTES 8.4 and 5.2: the Hub create-card schema names the link `transaction`, its example "
        "`transactions`; accept both keys and type-check whichever is present as {href}.",
    ),
    Deviation(
        "hub",
        "/components/schemas/Cart/properties/relationName",
        _nullable,
        "NOTES 3.1 and 8.8: checkout sends cart.relationName = null (the example does); the Provider and "
        "native specs mark it nullable, the Hub's _search Cart forgot to.",
    ),
    *(
        Deviation(
            spec,
            pointer + _JSON_200,
            _required_on_items,
            "NOTES 3.7: these list schemas put `required: [oid, value, date]` on the array, where JSON Schema "
            "ignores it; every settlement/cancellation record needs those fields, so require them per item.",
        )
        for spec, pointer in (
            ("provider", "/paths/~1giftcards~1{giftCardId}~1transactions~1{tId}~1settlements/get"),
            ("hub", _HUB_TRANSACTION + "~1{tId}~1settlements/get"),
            ("hub", _HUB_TRANSACTION + "~1{tId}~1cancellations/get"),
        )
    ),
    *(
        Deviation(
            spec,
            f"/components/schemas/{schema}",
            widen_integer_amounts,
            "NOTES 8.5 and 3: cart totals, item prices and price-tag values are typed `integer` but are "
            "decimals in practice (14.99, -7.5); money fields accept any number, counts stay integers.",
        )
        for spec, schemas in _INTEGER_AMOUNT_SCHEMAS.items()
        for schema in schemas
    ),
)


def _pointer_parts(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ValueError(f"not a JSON pointer: {pointer!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def _walk(node: Any, parts: list[str]) -> Any:
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def resolve_pointer(document: Any, pointer: str) -> Any:
    """The value at an RFC 6901 pointer (``#`` prefix allowed); KeyError if it is not there."""
    return _walk(document, _pointer_parts(pointer.removeprefix("#")))


def _apply(document: dict, deviation: Deviation) -> None:
    *parents, leaf = _pointer_parts(deviation.pointer)
    container = _walk(document, parents)
    container[leaf] = deviation.patch(container[leaf])


@functools.cache
def _patched_spec(key: str) -> dict[str, Any]:
    document = copy.deepcopy(_raw_spec(key))
    for deviation in DEVIATIONS:
        if deviation.spec == key:
            _apply(document, deviation)
    return document


def patched_spec(spec_name: str) -> dict[str, Any]:
    """The spec with :data:`DEVIATIONS` applied (a fresh deep copy)."""
    return copy.deepcopy(_patched_spec(spec_key(spec_name)))


# --------------------------------------------------------------------------------------------
# Operations


@dataclass(frozen=True)
class Operation:
    spec: str
    operation_id: str
    method: str  # upper case
    path: str  # as in the spec, e.g. /giftcards/{giftCardId}

    def url_path(self, **params: str) -> str:
        """The path with its ``{placeholders}`` filled in, e.g. ``url_path(giftCardId="7")``."""
        return self.path.format(**params)


def operations(spec_name: str) -> list[Operation]:
    """Every operation of a spec, in document order."""
    key = spec_key(spec_name)
    return [
        Operation(key, op["operationId"], method.upper(), path)
        for path, item in _raw_spec(key)["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]


def operation(spec_name: str, operation_id: str) -> Operation:
    for candidate in operations(spec_name):
        if candidate.operation_id == operation_id:
            return candidate
    known = ", ".join(op.operation_id for op in operations(spec_name))
    raise KeyError(f"{spec_name} has no operation {operation_id!r}; it has: {known}")


def _operation_object(key: str, operation_id: str) -> dict:
    op = operation(key, operation_id)
    return _patched_spec(key)["paths"][op.path][op.method.lower()]


def _content_schema(content: dict | None) -> dict | None:
    # NOTES 8.9: the same JSON comes under several media types; the type key carries no meaning here.
    if not content:
        return None
    media = content.get("application/json") or next(iter(content.values()))
    return media.get("schema")


# --------------------------------------------------------------------------------------------
# OpenAPI 3.0 schema -> JSON Schema


def to_json_schema(schema: Any, document: dict, _seen: tuple[str, ...] = ()) -> Any:
    """Inline local ``$ref``s and translate ``nullable``; drop documentation-only keys."""
    if isinstance(schema, list):
        return [to_json_schema(item, document, _seen) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $refs are supported, got {ref!r}")
        if ref in _seen:
            raise ValueError(f"recursive $ref {ref!r} cannot be inlined")
        # OpenAPI 3.0 ignores siblings of $ref, so the target replaces the whole node.
        return to_json_schema(resolve_pointer(document, ref), document, (*_seen, ref))
    converted = {
        key: to_json_schema(value, document, _seen)
        for key, value in schema.items()
        if key not in _DOC_ONLY_KEYS and key != "nullable"
    }
    return _with_null(converted) if schema.get("nullable") is True else converted


def _with_null(schema: dict) -> dict:
    if "enum" in schema and None not in schema["enum"]:
        schema = {**schema, "enum": [*schema["enum"], None]}
    declared = schema.get("type")
    if declared is None:
        return schema  # untyped already admits null
    types = declared if isinstance(declared, list) else [declared]
    return {**schema, "type": [*types, "null"] if "null" not in types else types}


def response_schema(spec_name: str, operation_id: str, status: int | str) -> dict | None:
    """JSON Schema for a documented response; None when that response documents no body."""
    key = spec_key(spec_name)
    responses = _operation_object(key, operation_id)["responses"]
    documented = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX") or responses.get("default")
    if documented is None:
        raise SpecViolation(
            f"{key} {operation_id}: status {status} is not documented (documented: {', '.join(responses)})"
        )
    return _json_schema_or_none(key, _content_schema(documented.get("content")))


def request_schema(spec_name: str, operation_id: str) -> dict | None:
    """JSON Schema for an operation's request body; None when it takes no body."""
    key = spec_key(spec_name)
    request_body = _operation_object(key, operation_id).get("requestBody") or {}
    return _json_schema_or_none(key, _content_schema(request_body.get("content")))


def _json_schema_or_none(key: str, schema: dict | None) -> dict | None:
    return None if schema is None else to_json_schema(schema, _patched_spec(key))


# --------------------------------------------------------------------------------------------
# Validation


def validate_response(spec_name: str, operation_id: str, status: int | str, body: Any) -> None:
    """Check a decoded JSON response body (``None`` for no body) against the spec."""
    schema = response_schema(spec_name, operation_id, status)
    _check(schema, body, f"{spec_key(spec_name)} {operation_id} {status} response")


def validate_request(spec_name: str, operation_id: str, body: Any) -> None:
    """Check a decoded JSON request body (``None`` for no body) against the spec."""
    schema = request_schema(spec_name, operation_id)
    _check(schema, body, f"{spec_key(spec_name)} {operation_id} request")


def _check(schema: dict | None, body: Any, what: str) -> None:
    if schema is None:
        if body not in (None, b"", ""):
            raise SpecViolation(f"{what}: the spec documents no body, got {_quote(body)}")
        return
    errors = sorted(_errors(schema, body), key=lambda error: list(error.absolute_path))
    if errors:
        lines = "\n".join(f"  at {_where(error)}: {error.message}" for error in errors)
        raise SpecViolation(f"{what} does not match the spec:\n{lines}\nbody: {_quote(body)}")


def _errors(schema: dict, body: Any) -> Iterator[jsonschema.ValidationError]:
    return jsonschema.Draft4Validator(schema).iter_errors(body)


def _where(error: jsonschema.ValidationError) -> str:
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)


def _quote(body: Any) -> str:
    text = json.dumps(body, default=str)
    return text if len(text) <= _BODY_QUOTE_CHARS else text[:_BODY_QUOTE_CHARS] + "…"


def examples(spec_name: str) -> Iterator[tuple[str, str, Any]]:
    """Every request/response example in a spec as (operation_id, "request"|status, example)."""
    key = spec_key(spec_name)
    for op in operations(key):
        op_object = _raw_spec(key)["paths"][op.path][op.method.lower()]
        request_body = op_object.get("requestBody") or {}
        for media in (request_body.get("content") or {}).values():
            for example in _media_examples(media):
                yield op.operation_id, "request", example
        for status, response in op_object["responses"].items():
            for media in (response.get("content") or {}).values():
                for example in _media_examples(media):
                    yield op.operation_id, status, example


def _media_examples(media: dict) -> Iterator[Any]:
    if "example" in media:
        yield media["example"]
    for named in (media.get("examples") or {}).values():
        if "value" in named:
            yield named["value"]
