"""Creating subscriptions: what a URL, an event filter and a description must be, and the secret.

The signing secret is generated here, returned once, and stored sealed with the credentials
cipher (AES-256-GCM under a key derived from ``GIFTCARD_SECRET_KEY``). Without that key a
subscription is refused, as provider credentials are: a secret the deliverer must read in
clear cannot be stored as a hash, and storing it in clear would let anyone with a database
dump forge deliveries.

While a secret rotates, the sealed text holds the new secret and the previous one, separated by a
space (neither contains one): deliveries are signed with both, so a receiver can switch at its
own pace, until the operator drops the previous one.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import asyncpg

from hub.providers.egress import EgressPolicy
from hub.webhooks import storage
from hub.webhooks.events import EVENT_TYPES
from hub.webhooks.signing import new_secret
from ledger.domain.errors import InvalidRequest
from ledger.postgres.credentials_cipher import CredentialsCipher, SecretKeyMissing

URL_CHARS_MAX = 2048
DESCRIPTION_CHARS_MAX = 256
SUBSCRIPTIONS_MAX = 100  # each one may hold a database connection while it delivers
ID_BYTES = 8
URL_SCHEMES = ("https", "http")


class WebhookUrlRefused(InvalidRequest):
    code = "webhook_url_not_allowed"


@dataclass(frozen=True)
class CreatedSubscription:
    subscription: storage.Subscription
    secret: str = field(repr=False)  # shown once, in the answer to the creation; never again


def secret_context(subscription_id: str) -> str:
    """Associated data of the sealed secret: a secret copied to another row does not open there."""
    return f"webhook:{subscription_id}"


def seal_secrets(cipher: CredentialsCipher, subscription_id: str, signing_secrets: Sequence[str]) -> str:
    return cipher.encrypt(" ".join(signing_secrets).encode(), context=secret_context(subscription_id))


def open_secrets(cipher: CredentialsCipher, subscription_id: str, sealed: str) -> tuple[str, ...]:
    """The secrets deliveries are signed with: the current one, then the previous one if rotating."""
    return tuple(cipher.decrypt(sealed, context=secret_context(subscription_id)).decode().split(" "))


async def rotate_secret(pool: asyncpg.Pool, cipher: CredentialsCipher, subscription_id: str) -> str:
    """A new secret, returned once; the current one keeps signing beside it until dropped.

    Rotating again while a previous secret is still kept drops that one: two secrets at most.
    """
    secret = new_secret()
    async with pool.acquire() as connection, connection.transaction():
        current, *_ = open_secrets(
            cipher, subscription_id, await storage.sealed_secret_for_update(connection, subscription_id)
        )
        await storage.set_sealed_secret(
            connection, subscription_id, seal_secrets(cipher, subscription_id, [secret, current])
        )
    return secret


async def drop_previous_secret(pool: asyncpg.Pool, cipher: CredentialsCipher, subscription_id: str) -> bool:
    """Ends a rotation: only the current secret signs from the next delivery on. False if none was kept."""
    async with pool.acquire() as connection, connection.transaction():
        current, *previous = open_secrets(
            cipher, subscription_id, await storage.sealed_secret_for_update(connection, subscription_id)
        )
        if previous:
            await storage.set_sealed_secret(
                connection, subscription_id, seal_secrets(cipher, subscription_id, [current])
            )
    return bool(previous)


async def create_subscription(
    pool: asyncpg.Pool,
    cipher: CredentialsCipher,
    policy: EgressPolicy,
    *,
    url: str,
    event_types: Sequence[str] | None,
    description: str | None = None,
) -> CreatedSubscription:
    check_url(url)
    wanted = check_event_types(event_types)
    check_description(description)
    if not cipher.available:
        raise SecretKeyMissing(
            "webhook signing secrets cannot be stored: set GIFTCARD_SECRET_KEY so they are encrypted at rest"
        )
    await check_destination(policy, url)
    subscription_id = "wh_" + secrets.token_hex(ID_BYTES)
    secret = new_secret()
    subscription = await storage.create(
        pool,
        id=subscription_id,
        url=url,
        event_types=wanted,
        description=description,
        sealed_secret=seal_secrets(cipher, subscription_id, [secret]),
        subscriptions_max=SUBSCRIPTIONS_MAX,
    )
    return CreatedSubscription(subscription, secret)


# ---- checks: one per rule ------------------------------------------------------------------


def check_url(url: str) -> None:
    if not url or len(url) > URL_CHARS_MAX:
        raise InvalidRequest(f"url must be a non-empty URL of at most {URL_CHARS_MAX} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number in range)
    except ValueError:
        raise InvalidRequest(f"url is not a valid URL: {url!r}") from None
    if parts.scheme not in URL_SCHEMES or not parts.hostname:
        raise InvalidRequest(f"url must be an absolute {' or '.join(URL_SCHEMES)} URL, got {url!r}")
    if parts.username is not None or parts.password is not None:
        # Deliveries are authenticated by their signature; a password in the URL would be shown
        # by every listing and end up in logs.
        raise InvalidRequest("url must not carry a user name or password; receivers check the signature")


def check_event_types(event_types: Sequence[str] | None) -> list[str] | None:
    """The filter as stored: None (every type, including later ones) or known types, each once."""
    if event_types is None:
        return None
    unknown = [t for t in event_types if t not in EVENT_TYPES]
    if unknown or not event_types:
        raise InvalidRequest(f"events must be a non-empty list of {', '.join(EVENT_TYPES)}; got {list(event_types)}")
    return sorted(set(event_types), key=EVENT_TYPES.index)


def check_description(description: str | None) -> None:
    if description is not None and len(description) > DESCRIPTION_CHARS_MAX:
        raise InvalidRequest(f"description must be at most {DESCRIPTION_CHARS_MAX} characters")


async def check_destination(policy: EgressPolicy, url: str) -> None:
    """Webhooks are outbound HTTP like provider calls: the same egress policy (and allowlist) applies."""
    try:
        await policy.check_url(url)
    except InvalidRequest as e:
        # The policy's messages name the provider registry's field; here the field is ``url``.
        raise WebhookUrlRefused(e.message.replace("serviceUrl", "url")) from None
