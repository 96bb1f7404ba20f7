-- Failed redemption-code lookups, counted per subject (a shopper identifier, or the caller's
-- address) in fixed windows, shared by every hub process. Only failures are written: a lookup
-- that finds its card costs nothing here.

create table lookup_failures (
    subject   text    not null,
    bucket    bigint  not null,  -- floor(epoch seconds / window seconds)
    failures  integer not null,
    primary key (subject, bucket)
);
