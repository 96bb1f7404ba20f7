"""A small, schema-driven JSON fuzzer built on Hypothesis strategies (no extra dependency).

The request schemas of the VTEX specs are plain Draft 4 objects (``type``, ``properties``,
``required``, ``items``, ``enum``, ``anyOf``, nullable type lists), so a few dozen lines turn
them into strategies; a general JSON-Schema fuzzer (schemathesis, hypothesis-jsonschema)
would add a dependency for nothing here.

- :func:`from_schema` draws *conforming* instances. ``hints`` maps a property name to a
  strategy that knows what the value means (a real redemption code, a small amount, a fresh
  requestId); it is mixed with the generic one, so schema-typed noise still appears.
- :func:`mutated` applies adversarial edits to a conforming instance: wrong types, huge and
  tiny numbers, ``"NaN"``/``"Infinity"`` strings, raw ``NaN``/``1e999999`` tokens, NUL and
  other awkward unicode, lone surrogates, deep nesting, missing and extra fields.
- :func:`raw_bodies` draws bodies that are not a JSON object at all (invalid JSON, invalid
  UTF-8, a BOM, a list, a scalar, nothing).
- :func:`garbage_ids` draws path parameters that name nothing, path-traversal-like ones
  included, percent-encoded so the request line stays valid; :func:`uuid_spellings` gives
  the other spellings of a real id that still name it.

:func:`encode_json` renders a drawn value to bytes; :class:`Raw` injects a literal token and
:class:`Fresh` becomes a new unique string each time it is encoded (so that, say, a drawn
``relationName`` does not collide with the card an earlier example created).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

JSON_DEPTH_LIMIT = 32  # hub.wire.JSON_DEPTH_MAX: one level deeper must be refused, not crash


@dataclass(frozen=True)
class FuzzRequest:
    """One request a fuzz test draws; its repr is cut short, so that a failing example stays readable."""

    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    auth: str = "valid"
    oversized: bool = False  # a header larger than the server takes: a refusal must write nothing

    def __repr__(self) -> str:
        body = None if self.body is None else self.body[:800] + (b"..." if len(self.body) > 800 else b"")
        headers = {k: (v if len(v) < 200 else v[:20] + f"...({len(v)} chars)") for k, v in self.headers.items()}
        return f"{self.method} {self.path[:300]} auth={self.auth} headers={headers} body={body!r}"


@dataclass(frozen=True)
class Raw:
    """A literal JSON token written as is (``NaN``, ``1e999999``, ``-0``, a 5000-digit integer)."""

    token: str


@dataclass(frozen=True)
class Fresh:
    """A placeholder for a string that must be new on every request (rendered as prefix-uuid)."""

    prefix: str = "fresh"

    def render(self) -> str:
        return f"{self.prefix}-{uuid.uuid4().hex}"


# ---- encoding -------------------------------------------------------------------


def encode_json(value: Any, *, ascii_only: bool = True) -> bytes:
    """JSON bytes for a drawn value; non-ASCII output uses surrogatepass, so a lone surrogate
    becomes invalid UTF-8 on the wire, which is itself a case worth sending."""
    return _encode(value, ascii_only).encode("utf-8", "surrogatepass")


def _encode(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return value.token
    if isinstance(value, Fresh):
        return json.dumps(value.render())
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)  # no 4300-digit limit here: big integers are built as Raw tokens
    if isinstance(value, float):
        return json.dumps(value)  # allow_nan: NaN/Infinity literals are invalid JSON on purpose
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_encode(str(k), ascii_only)}:{_encode(v, ascii_only)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(v, ascii_only) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


def materialize(value: Any) -> Any:
    """The value with every Fresh rendered, for callers that also want to look at it."""
    if isinstance(value, Fresh):
        return value.render()
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v) for v in value]
    return value


# ---- conforming instances ---------------------------------------------------------

# Text a VTEX caller could plausibly send, plus arbitrary unicode (Hypothesis' default
# alphabet: every code point but surrogates, NUL included).
plain_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=24)
any_text = st.text(max_size=24)
money = st.one_of(
    st.integers(min_value=1, max_value=10_000),
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal("10000"), places=2),
)


def from_schema(schema: dict | None, hints: dict[str, st.SearchStrategy] | None = None) -> st.SearchStrategy:
    """Instances of ``schema``; properties named in ``hints`` draw from the hint or the schema."""
    hints = hints or {}
    if not schema:
        return json_values()
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, hints) for s in schema.get("anyOf") or schema["oneOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    declared = schema.get("type")
    types = declared if isinstance(declared, list) else [declared]
    return st.one_of([_of_type(t, schema, hints) for t in types])


def _of_type(type_: str | None, schema: dict, hints: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    if type_ == "object" or (type_ is None and "properties" in schema):
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))

        def prop(name: str, sub: dict) -> st.SearchStrategy:
            generic = from_schema(sub, hints)
            return st.one_of(hints[name], generic) if name in hints else generic

        return st.fixed_dictionaries(
            {name: prop(name, sub) for name, sub in properties.items() if name in required},
            optional={name: prop(name, sub) for name, sub in properties.items() if name not in required},
        )
    if type_ == "array":
        return st.lists(from_schema(schema.get("items"), hints), max_size=3)
    if type_ == "string":
        return st.one_of(plain_text, any_text, st.sampled_from(EVIL_STRINGS))  # all schema-valid strings
    if type_ == "number":
        return st.one_of(
            money,
            st.floats(allow_nan=False, allow_infinity=False),
            st.integers(),
            st.sampled_from([n for n in EVIL_NUMBERS if not isinstance(n, Raw) or n.token[-1].isdigit()]),
        )
    if type_ == "integer":
        return st.integers(min_value=-(2**63), max_value=2**64)
    if type_ == "boolean":
        return st.booleans()
    if type_ == "null":
        return st.none()
    return json_values()


def json_values(max_leaves: int = 6) -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), any_text)
    return st.recursive(
        scalars,
        lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(any_text, children, max_size=3)),
        max_leaves=max_leaves,
    )


# ---- adversarial values and mutations --------------------------------------------------


def nested(depth: int, leaf: Any = 1, *, as_list: bool = False) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {"a": value}
    return value


EVIL_NUMBERS = (
    0,
    -1,
    Raw("-0"),
    Raw("-0.0"),
    0.001,
    1.005,
    -0.01,
    1e308,
    -1e308,
    5e-324,
    2**63,
    2**64 + 1,
    -(2**63) - 1,
    Raw("1e999999"),
    Raw("-1e999999"),
    Raw("1E-400"),
    Raw("1" + "0" * 5000),
    Raw("0." + "0" * 4000 + "1"),
    Raw("123456789012345678901234567890.12"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
)

EVIL_STRINGS = (
    "",
    " ",
    "\t\n",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-0",
    "0x10",
    "1,5",
    "null",
    "true",
    "\x00",
    "a\x00b",
    "\ud800",  # a lone surrogate: escaped (\ud800) or raw (invalid UTF-8) depending on encoding
    "\udfff\ud800",
    "\ufeff",
    "\u202eRTL",
    "\u2028\u2029",
    "e\u0301",
    "\U0001f4b3\U0001f381",
    "Ω" * 300,
    "../../etc/passwd",
    "..\\..\\windows",
    "%00",
    "%2e%2e%2f",
    "' or '1'='1' --",
    "<script>alert(1)</script>",
    "${jndi:ldap://x}",
    "{{7*7}}",
    "x" * 5000,
)

EVIL_SHAPES = (
    None,
    True,
    False,
    [],
    {},
    [1, "a", None],
    {"$ref": "#"},
    {"__proto__": {"polluted": True}},
)


def evil_values() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(EVIL_NUMBERS),
        st.sampled_from(EVIL_STRINGS),
        st.sampled_from(EVIL_SHAPES),
        st.builds(nested, st.integers(min_value=JSON_DEPTH_LIMIT - 2, max_value=JSON_DEPTH_LIMIT + 40)),
        st.builds(
            lambda depth: nested(depth, as_list=True),
            st.integers(min_value=JSON_DEPTH_LIMIT - 2, max_value=JSON_DEPTH_LIMIT + 40),
        ),
        st.floats(),  # NaN and infinities included: raw invalid tokens once encoded
        st.integers(),
        st.text(max_size=40),
        json_values(),
    )


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON value, the root included, as a tuple of keys/indices."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _get(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _wrong_type(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float | Decimal):
        return str(value)  # "10.5" where a number belongs
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return 0


@st.composite
def mutated(draw, body_strategy: st.SearchStrategy, max_edits: int = 3) -> Any:
    """A conforming body with 1..max_edits adversarial edits."""
    body = _copy(draw(body_strategy))
    for _ in range(draw(st.integers(min_value=1, max_value=max_edits))):
        path = draw(st.sampled_from(_paths(body)))
        node = _get(body, path)
        edit = draw(st.sampled_from(("replace", "retype", "drop", "extra", "nest")))
        if edit == "drop" and path:
            parent = _get(body, path[:-1])
            del parent[path[-1]]
            continue
        if edit == "extra" and isinstance(node, dict):
            node[draw(st.one_of(plain_text, st.sampled_from(EVIL_STRINGS)))] = _copy(draw(evil_values()))
            continue
        if edit == "retype":
            new = _wrong_type(node)
        elif edit == "nest":
            new = nested(draw(st.integers(min_value=JSON_DEPTH_LIMIT - 2, max_value=JSON_DEPTH_LIMIT + 10)), node)
        else:
            new = _copy(draw(evil_values()))  # never edit the shared EVIL_SHAPES in place later
        if not path:
            body = new
        else:
            _get(body, path[:-1])[path[-1]] = new
    return body


def raw_bodies(valid: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """Bytes that are not a well-formed JSON object (plus a couple that almost are)."""
    almost = valid.map(lambda body: encode_json(body))
    return st.one_of(
        st.sampled_from(
            (
                b"",
                b"   ",
                b"null",
                b"[]",
                b"[{}]",
                b'"a string"',
                b"42",
                b"true",
                b"{",
                b"}",
                b"{not json}",
                b"{'single': 'quotes'}",
                b'{"a":1,}',
                b'{"a":NaN}',
                b'{"value":Infinity}',
                b"\xff\xfe\xfd",
                b'{"requestId":"\xc3\x28"}',
                b'{"requestId":"\xed\xa0\x80"}',
                b"\x00",
                b'{"a":1}\x00',
                b'{"a":1}{"b":2}',
                b"[" * 10_000,
                b'{"a":' * 200 + b"1" + b"}" * 200,
                b'{"requestId":"' + b"x" * 70_000 + b'"}',  # over the 64 KiB body limit: 413
            )
        ),
        almost.map(lambda data: data[: max(1, len(data) // 2)]),  # truncated
        almost.map(lambda data: b"\xef\xbb\xbf" + data),  # UTF-8 BOM
        almost.map(lambda data: data + b" trailing"),
        almost.map(lambda data: data.replace(b"{", b'{"dup":1,"dup":[],', 1)),  # duplicate keys
        st.binary(max_size=64),
    )


# ---- path parameters ---------------------------------------------------------------

TRAVERSAL = (
    "..",
    ".",
    "%2e%2e",
    "%2E%2E%2F..%2F",
    "..%2f..%2f..%2fetc%2fpasswd",
    "..%5c..%5cwindows",
    "%252e%252e%252f",
    "%00",
    "x%00.json",
    "%ff%fe",
    "%c0%ae%c0%ae",
    "~",
    "%20",
    "_search",
    "null",
    "undefined",
    "0",
    "-1",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "x" * 4000,
)


def uuid_spellings(card_id: str) -> list[str]:
    """Other spellings Python's uuid.UUID accepts for the same id (all still name that card)."""
    hex_ = card_id.replace("-", "")
    return [card_id.upper(), hex_, quote("{" + card_id + "}", safe=""), "urn:uuid:" + card_id]


def garbage_ids() -> st.SearchStrategy[str]:
    """A path segment that names nothing: traversal-like, random UUIDs, arbitrary text
    (percent-encoded, so the request line stays valid HTTP), or hex-ish near misses."""
    return st.one_of(
        st.sampled_from(TRAVERSAL),
        st.uuids().map(str),
        st.text(min_size=1, max_size=30).map(lambda text: quote(text, safe="")),
        st.text(alphabet="0123456789abcdef-", min_size=1, max_size=40),
    )
