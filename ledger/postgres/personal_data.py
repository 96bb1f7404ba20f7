"""Shoppers' personal data: encrypted per person at rest, erasable, and the ledger still verifiable.

Personal fields (and only these): an ``Issued`` card's ``profile_id``; a ``Credited`` or
``Debited`` transaction's ``order_info.clientProfile`` and ``order_info.shipping``. Amounts, ids,
dates, currency, requestIds, descriptions and the rest of ``order_info`` (orderId, sequence,
cart) are not. Each personal field is stored in the event as an envelope
``{"ct": base64(nonce | AES-256-GCM ciphertext), "pii": key id}`` under a data key of its
person, so the hash chain covers the ciphertext and verifies whether the key exists or not.

A person (a *subject*) is named by a keyed hash of one identifier, never the identifier: the
card's profileId for its issue; the shopper's e-mail (else document) for a transaction's order
info. A profileId that is an e-mail is therefore the same person as that e-mail's orders.

Data keys sit in ``personal_data_keys``, each wrapped under a key derived from
``GIFTCARD_SECRET_KEY`` (ledger.postgres.instance_keys). ``forget`` nulls them: what was sealed under
them reads back as ``ERASED`` from then on, in every process within ``FORGOTTEN_POLL_S``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import asyncpg
import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.domain import topics
from ledger.domain.giftcard import GiftCard
from ledger.domain.snapshot import take_snapshot
from ledger.eventstore.store import EventStore, NewEvent
from ledger.postgres.instance_keys import instance_key
from ledger.postgres.tenancy import current_scope, tenant_scope

PROFILE = "profile_id"
ORDER_INFO = "order_info"
ORDER_INFO_PERSONAL = ("clientProfile", "shipping")
# What a personal field reads as once its person is forgotten (JSON null on the wire).
ERASED = None
PERSONAL_EVENT_TYPES = topics.stored_types(topics.ISSUED, topics.CREDITED, topics.DEBITED)
FORGOTTEN = "PersonalDataForgotten"  # the event type that records an erasure
FORGOTTEN_STREAM_PREFIX = "privacy-"

NONCE_BYTES = 12
DATA_KEY_BYTES = 32
# How often a process asks which keys were forgotten (by another process: the CLI). A forgotten
# person reads as erased, and gets no more data sealed under the old key, at most this long after.
FORGOTTEN_POLL_S = 5.0  # the default of GIFTCARD_PRIVACY_POLL_S
# A forget commits after it reads the clock: each poll looks back this far, so none is missed.
FORGOTTEN_OVERLAP = "1 minute"
KEYS_CACHED_MAX = 100_000  # past this, the caches are dropped at once and refilled

_json_encoder = msgspec.json.Encoder(order="sorted")
_json_decoder = msgspec.json.Decoder()

_KEY_OF_SUBJECT = """
with found as (
    select key_id, wrapped_key from personal_data_keys
    where subject = $1 and wrapped_key is not null
    order by created_at, key_id
    limit 1
), made as (
    insert into personal_data_keys (key_id, subject, wrapped_key)
    select $2, $1, $3 where not exists (select 1 from found)
    returning key_id, wrapped_key
)
select key_id, wrapped_key from found union all select key_id, wrapped_key from made
"""
_KEYS_BY_ID = "select key_id, wrapped_key from personal_data_keys where key_id = any($1::text[])"
_FORGOTTEN_SINCE = f"""
select array(select key_id from personal_data_keys where forgotten_at > $1::timestamptz - interval '{FORGOTTEN_OVERLAP}'),
       now()
"""


class _Cached(NamedTuple):
    aead: AESGCM | None  # None: forgotten, or no such key
    key_id: str


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 2 and "pii" in value and "ct" in value


def sealed_to_text(sealed: dict[str, str]) -> str:
    """A sealed field as the text a ``str`` field holds (a snapshot's profileId)."""
    return _json_encoder.encode(sealed).decode()


def sealed_from_text(text: str) -> Any:
    """The sealed field ``sealed_to_text`` wrote; any other text (a profileId in clear) as it is."""
    if text.startswith('{"ct":'):
        try:
            decoded = _json_decoder.decode(text)
        except msgspec.DecodeError:
            return text
        if is_sealed(decoded):
            return decoded
    return text


def snapshot_of(card: GiftCard, profile: Any) -> bytes:
    """A card's snapshot with its owner's profileId as the Issued event stores it (``profile``: sealed,
    as its text), never in clear: and an auditor's replay, which holds no key, takes the very same one."""
    in_memory = card.profile_id
    card.profile_id = sealed_to_text(profile) if is_sealed(profile) else profile
    try:
        return take_snapshot(card)
    finally:
        card.profile_id = in_memory


def normalized(identifier: str) -> str:
    """E-mails are case-insensitive in practice, and a profileId is often one."""
    return identifier.strip().casefold()


def identifiers_of(state: Mapping[str, Any]) -> list[str]:
    """The person of each personal field an event's state holds, as the identifier that names them."""
    found = []
    if isinstance(state.get(PROFILE), str) and state[PROFILE].strip():
        found.append(state[PROFILE])
    order_info = state.get(ORDER_INFO)
    if isinstance(order_info, dict) and any(order_info.get(name) is not None for name in ORDER_INFO_PERSONAL):
        found.append(shopper_of(order_info))
    return found


def shopper_of(order_info: Mapping[str, Any]) -> str:
    """Whom an order's personal fields belong to: the shopper's e-mail, else document. An order
    naming neither gets a person of its own (sealed all the same, but found by no ``forget``)."""
    profile = order_info.get("clientProfile")
    if isinstance(profile, dict):
        for name in ("email", "document", "corporateDocument"):
            if isinstance(profile.get(name), str) and profile[name].strip():
                return profile[name]
    return "anonymous-order:" + hashlib.sha256(_json_encoder.encode(order_info)).hexdigest()


class PersonalData:
    """Seals and opens personal fields; keeps, caches and forgets the data keys (one per process)."""

    def __init__(
        self, pool: asyncpg.Pool, root_secret: str | None = None, forgotten_poll_s: float | None = None
    ) -> None:
        """``root_secret``: GIFTCARD_SECRET_KEY, which the data keys are wrapped under (None: the
        database's instance secret); ``forgotten_poll_s``: how often forgotten keys are asked for."""
        self.pool = pool
        self.root_secret = root_secret
        self.forgotten_poll_s = FORGOTTEN_POLL_S if forgotten_poll_s is None else forgotten_poll_s
        self._wrapping: AESGCM | None = None
        self._subject_key = b""
        # (tenant, subject) -> the key new data of theirs is sealed with: each store keeps its own keys
        # (row-level security), even for a person two stores share
        self._of_subject: dict[tuple[str, str], _Cached] = {}
        self._by_id: dict[str, _Cached] = {}
        self._subjects: dict[str, str] = {}  # identifier -> subject
        self._polled_at: Any = None  # the database's clock at the last poll for forgotten keys
        self._next_poll = 0.0

    async def _ready(self) -> None:
        if self._wrapping is None:
            self._subject_key = await instance_key(self.pool, "personal-data-subjects", self.root_secret)
            self._wrapping = AESGCM(await instance_key(self.pool, "personal-data-keys", self.root_secret))

    def subject_of(self, identifier: str) -> str:
        """The keyed hash that names a person (call after ``prepare`` or any other awaited method);
        remembered, as a Debit asks for its shopper's up to three times."""
        subject = self._subjects.get(identifier)
        if subject is None:
            subject = hmac.new(self._subject_key, normalized(identifier).encode(), hashlib.sha256).hexdigest()
            if len(self._subjects) >= KEYS_CACHED_MAX:
                self._subjects.clear()
            self._subjects[identifier] = subject
        return subject

    async def subjects_of(self, identifiers: Iterable[str]) -> list[str]:
        await self._ready()
        return [self.subject_of(i) for i in identifiers]

    # ---- writing -------------------------------------------------------------------------------

    async def prepare(self, states: Iterable[Mapping[str, Any]]) -> None:
        """Makes sure every person in ``states`` has a stored key, so ``sealed`` needs no I/O. A new
        person's key is committed before the events that use it: a lost append leaves only a key."""
        await self._ready()
        for identifier in {i for state in states for i in identifiers_of(state)}:
            subject = self.subject_of(identifier)
            if (current_scope(), subject) not in self._of_subject:
                self._remember(self._of_subject, (current_scope(), subject), await self._key_of_subject(subject))

    async def _key_of_subject(self, subject: str) -> _Cached:
        key_id = secrets.token_urlsafe(16)
        data_key = AESGCM.generate_key(bit_length=8 * DATA_KEY_BYTES)
        row = await self.pool.fetchrow(_KEY_OF_SUBJECT, subject, key_id, self._wrap(key_id, data_key))
        cached = self._unwrapped(row["key_id"], row["wrapped_key"])
        self._remember(self._by_id, cached.key_id, cached)
        return cached

    def sealed(self, state: dict[str, Any]) -> dict[str, Any]:
        """An event's state with its personal fields sealed (a copy; ``state`` is left as it was)."""
        if not identifiers_of(state):
            return state
        state = dict(state)
        profile = state.get(PROFILE)
        if isinstance(profile, str) and profile.strip():
            state[PROFILE] = self.seal(profile, profile)
        order_info = state.get(ORDER_INFO)
        if isinstance(order_info, dict):
            shopper = shopper_of(order_info)
            state[ORDER_INFO] = {
                name: self.seal(shopper, value) if name in ORDER_INFO_PERSONAL and value is not None else value
                for name, value in order_info.items()
            }
        return state

    def seal(self, identifier: str, value: Any) -> dict[str, str]:
        cached = self._of_subject[current_scope(), self.subject_of(identifier)]  # see prepare
        assert cached.aead is not None
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = cached.aead.encrypt(nonce, _json_encoder.encode(value), cached.key_id.encode())
        return {"ct": base64.b64encode(nonce + ciphertext).decode(), "pii": cached.key_id}

    # ---- reading -------------------------------------------------------------------------------

    async def open(self, value: Any) -> Any:
        """A sealed field's value, ``ERASED`` once its person is forgotten; anything else as it is
        (fields written before encryption existed, or not personal)."""
        if not is_sealed(value):
            return value
        cached = (await self._keys([value["pii"]]))[value["pii"]]
        return _decrypted(cached, value)

    async def opened_order_info(self, order_info: dict[str, Any]) -> dict[str, Any]:
        """``order_info`` as its caller sent it, the personal parts ``ERASED`` if forgotten."""
        sealed = {name: order_info[name] for name in ORDER_INFO_PERSONAL if is_sealed(order_info.get(name))}
        if not sealed:
            return order_info
        keys = await self._keys([v["pii"] for v in sealed.values()])
        return {**order_info, **{name: _decrypted(keys[v["pii"]], v) for name, v in sealed.items()}}

    async def _keys(self, key_ids: list[str]) -> dict[str, _Cached]:
        found = {k: c for k in key_ids if (c := self._by_id.get(k)) is not None}
        missing = [k for k in key_ids if k not in found]
        if missing:
            await self._ready()
            rows = {r["key_id"]: r["wrapped_key"] for r in await self.pool.fetch(_KEYS_BY_ID, missing)}
            for key_id in missing:
                found[key_id] = self._unwrapped(key_id, rows.get(key_id))
                self._remember(self._by_id, key_id, found[key_id])
        return found

    # ---- forgetting ----------------------------------------------------------------------------

    async def newly_forgotten(self) -> set[str]:
        """Keys this process held that were forgotten since it last asked (at most every
        ``FORGOTTEN_POLL_S``, else at once an empty set); they are dropped from its caches."""
        now = time.monotonic()
        if now < self._next_poll:
            return set()
        self._next_poll = now + self.forgotten_poll_s
        if self._polled_at is None:
            self._polled_at = await self.pool.fetchval("select now()")
            return set()
        forgotten, self._polled_at = await self.pool.fetchrow(_FORGOTTEN_SINCE, self._polled_at)
        return self.drop_keys(forgotten)

    def drop_keys(self, key_ids: Iterable[str]) -> set[str]:
        """Stops using keys that were destroyed; returns the ones this process held."""
        gone = set(key_ids)
        held = set()
        for cache in (self._of_subject, self._by_id):
            for name in [n for n, c in cache.items() if c.key_id in gone and c.aead is not None]:
                held.add(cache.pop(name).key_id)
        return held

    # ---- keys ----------------------------------------------------------------------------------

    def _wrap(self, key_id: str, data_key: bytes) -> bytes:
        assert self._wrapping is not None
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._wrapping.encrypt(nonce, data_key, key_id.encode())

    def _unwrapped(self, key_id: str, wrapped: bytes | None) -> _Cached:
        if wrapped is None:
            return _Cached(None, key_id)
        assert self._wrapping is not None
        try:
            data_key = self._wrapping.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], key_id.encode())
        except InvalidTag:
            raise RuntimeError(
                f"personal data key {key_id} cannot be unwrapped: GIFTCARD_SECRET_KEY is not the one it was made with"
            ) from None
        return _Cached(AESGCM(data_key), key_id)

    @staticmethod
    def _remember(cache: dict[Any, _Cached], name: Any, cached: _Cached) -> None:
        if len(cache) >= KEYS_CACHED_MAX:
            cache.clear()
        cache[name] = cached


def _decrypted(cached: _Cached, sealed: dict[str, str]) -> Any:
    if cached.aead is None:
        return ERASED
    raw = base64.b64decode(sealed["ct"])
    return _json_decoder.decode(cached.aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], cached.key_id.encode()))


def sealed_key_ids(state: Mapping[str, Any]) -> list[str]:
    """The keys an event's stored state names (for ``privacy export``)."""
    found = [state[PROFILE]["pii"]] if is_sealed(state.get(PROFILE)) else []
    order_info = state.get(ORDER_INFO)
    if isinstance(order_info, dict):
        found += [order_info[n]["pii"] for n in ORDER_INFO_PERSONAL if is_sealed(order_info.get(n))]
    return found


def without_personal(state: dict[str, Any]) -> dict[str, Any]:
    """An event's state with no personal field at all, sealed or not: what webhooks deliver."""
    state = {k: v for k, v in state.items() if k != PROFILE}
    order_info = state.get(ORDER_INFO)
    if isinstance(order_info, dict):
        state[ORDER_INFO] = {k: v for k, v in order_info.items() if k not in ORDER_INFO_PERSONAL}
    return state


# ---- the person's rights: erasure and access ----------------------------------------------------
#
# Each statement below runs in the scope of the store it acts for *and* names that store: an
# operator's tool may run as a role row-level security does not hold (a superuser), and on Citus
# card_lookup and events are outside it (ledger.postgres.distribution), while the same person's
# subject is the same in every store. Erasing another store's data is not left to the role.

_TENANTS_HOLDING = """
select tenant_id from personal_data_keys where subject = any($1::text[]) and wrapped_key is not null
union
select tenant_id from card_lookup where profile_id = any($2::text[])
order by 1
"""
_DESTROY_KEYS = """
update personal_data_keys set wrapped_key = null, forgotten_at = clock_timestamp()
where subject = any($1::text[]) and wrapped_key is not null and tenant_id = $2
returning key_id
"""
# card_lookup names a card's owner by subject (or, for cards issued before 0015, in clear).
_ERASE_OWNERS = "update card_lookup set profile_id = '' where profile_id = any($1::text[]) and tenant_id = $2"
# $2: one store, or null for every store in scope.
_KEYS_OF_SUBJECTS = """
select key_id, created_at, forgotten_at, tenant_id from personal_data_keys
where subject = any($1::text[]) and ($2::text is null or tenant_id = $2)
order by created_at
"""
_CARDS_OWNED = """
select card_id, tenant_id from card_lookup
where profile_id = any($1::text[]) and ($2::text is null or tenant_id = $2)
order by card_id
"""
# Events holding a sealed field under one of $2's keys, or (written before 0015) the person's
# identifiers ($3, normalized) in clear; $4 as above. A scan of the card events: an operator's
# command, not a request's.
_EVENTS_OF_PERSON = """
select stream_id, version, type, data::text as data, recorded_at, tenant_id from events
where type = any($1::text[])
  and ($4::text is null or tenant_id = $4)
  and (data -> 'profile_id' ->> 'pii' = any($2::text[])
       or data -> 'order_info' -> 'clientProfile' ->> 'pii' = any($2::text[])
       or data -> 'order_info' -> 'shipping' ->> 'pii' = any($2::text[])
       or lower(data ->> 'profile_id') = any($3::text[])
       or lower(data -> 'order_info' -> 'clientProfile' ->> 'email') = any($3::text[]))
order by stream_id, version
"""


class Forgotten(NamedTuple):
    tenant: str  # the store it was done in
    keys_destroyed: int
    owners_erased: int  # card_lookup rows that named the person as a card's owner
    erasure: str  # the stream of that store's PersonalDataForgotten event


def _owner_names(subjects: list[str], identifiers: list[str]) -> list[str]:
    """How card_lookup may name the person as a card's owner."""
    return subjects + [normalized(i) for i in identifiers] + list(identifiers)


async def forget(
    store: EventStore, personal: PersonalData, identifiers: list[str], actor: str, tenant: str | None = None
) -> list[Forgotten]:
    """Destroys every key of the people ``identifiers`` name and erases their cards' owner lookups,
    in store ``tenant``, or with None in every store holding any of it: one transaction per store,
    in its scope, recorded by a ``PersonalDataForgotten`` event of that store (who and when, no
    personal data). Idempotent: a store with nothing left to destroy writes nothing (and is not listed)."""
    subjects = await personal.subjects_of(identifiers)
    owners = _owner_names(subjects, identifiers)
    tenants = (
        [tenant] if tenant else [r["tenant_id"] for r in await store.pool.fetch(_TENANTS_HOLDING, subjects, owners)]
    )
    done = []
    for account in tenants:
        with tenant_scope(account):
            forgotten = await _forget_in_store(store, personal, account, subjects, owners, actor)
        if forgotten is not None:
            done.append(forgotten)
    return done


async def _forget_in_store(
    store: EventStore, personal: PersonalData, tenant: str, subjects: list[str], owners: list[str], actor: str
) -> Forgotten | None:
    async with store.pool.acquire() as connection, connection.transaction():
        key_ids = [r["key_id"] for r in await connection.fetch(_DESTROY_KEYS, subjects, tenant)]
        owners_erased = int((await connection.execute(_ERASE_OWNERS, owners, tenant)).split()[-1])
        if not key_ids and not owners_erased:
            return None
        data = {"keys_destroyed": len(key_ids), "owners_erased": owners_erased, "actor": actor}
        erasure = f"{FORGOTTEN_STREAM_PREFIX}{secrets.token_hex(16)}"
        # The event is the store's own (its tenant_id is the scope's): the store's export and audit hold it.
        await store.append(
            erasure,
            0,
            [NewEvent(FORGOTTEN, _json_encoder.encode(data))],
            metadata={"actor": actor},
            connection=connection,
        )
    personal.drop_keys(key_ids)
    return Forgotten(tenant, len(key_ids), owners_erased, erasure)


async def export(
    store: EventStore, personal: PersonalData, identifiers: list[str], tenant: str | None = None
) -> dict[str, Any]:
    """Everything held about the people ``identifiers`` name (the right of access), opened: in store
    ``tenant``, or with None in every store the caller's scope sees; each part names its store."""
    with tenant_scope(tenant or current_scope()):
        subjects = await personal.subjects_of(identifiers)
        keys = await store.pool.fetch(_KEYS_OF_SUBJECTS, subjects, tenant)
        key_ids = [k["key_id"] for k in keys]
        cards = await store.pool.fetch(_CARDS_OWNED, _owner_names(subjects, identifiers), tenant)
        rows = await store.pool.fetch(
            _EVENTS_OF_PERSON, PERSONAL_EVENT_TYPES, key_ids, [normalized(i) for i in identifiers], tenant
        )
        return {
            "identifiers": identifiers,
            "tenant": tenant,  # null: every store
            "keys": [
                {
                    "tenant": k["tenant_id"],
                    "createdAt": k["created_at"].isoformat(),
                    "forgottenAt": _iso(k["forgotten_at"]),
                }
                for k in keys
            ],
            "cardsOwned": [{"tenant": r["tenant_id"], "cardId": r["card_id"]} for r in cards],
            "events": [await _exported_event(personal, row, set(key_ids)) for row in rows],
        }


async def _exported_event(personal: PersonalData, row: asyncpg.Record, own_keys: set[str]) -> dict[str, Any]:
    """An event's personal fields that are the person's own (an owner's card may carry other shoppers' orders)."""
    state = _json_decoder.decode(row["data"])
    held: dict[str, Any] = {}
    profile = state.get(PROFILE)
    if profile is not None and (not is_sealed(profile) or profile["pii"] in own_keys):
        held["profileId"] = await personal.open(profile)
    order_info = state.get(ORDER_INFO)
    if isinstance(order_info, dict):
        held["orderId"] = order_info.get("orderId")
        for name in ORDER_INFO_PERSONAL:
            value = order_info.get(name)
            if value is not None and (not is_sealed(value) or value["pii"] in own_keys):
                held[name] = await personal.open(value)
    return {
        "tenant": row["tenant_id"],
        "cardId": row["stream_id"],
        "version": row["version"],
        "type": row["type"].rsplit(".", 1)[-1],
        "transactionId": state.get("transaction_id"),
        "recordedAt": row["recorded_at"].isoformat(),
        **held,
    }


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()
