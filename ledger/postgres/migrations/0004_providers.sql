-- The provider registry as every hub process reads it: a projection of the provider-* streams,
-- updated in the same transaction as the event that changes it. credentials holds the
-- AES-GCM ciphertext of {appKey, appToken}, never the clear values.

create table providers (
    id                text primary key,
    service_url       text        not null,
    oauth_provider    text        not null,
    caption           text,
    pre_auth_enabled  boolean     not null,
    cancel_enabled    boolean     not null,
    credentials       text,
    version           integer     not null,
    updated_at        timestamptz not null default clock_timestamp()
);
