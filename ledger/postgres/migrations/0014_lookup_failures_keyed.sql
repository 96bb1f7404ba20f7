-- Failed code lookups are now counted per (caller key, shopper identity) pair and per caller,
-- each subject stored as a keyed hash (hub.http.throttle): the rows written before named shoppers
-- (their id, e-mail or document) and calling addresses in clear. They only ever served a
-- ten-minute window, so they are dropped rather than converted.

delete from lookup_failures where subject like 'client:%' or subject like 'address:%';

comment on column lookup_failures.subject is
    'shopper:HMAC(caller key, client identity) or caller:HMAC(caller key); never the values themselves';
