"""One card as the release before stable event names (b4ae0da) wrote it: its ``events`` rows
(type, canonical data, chain hash) and its snapshot, captured from that release's own domain, mapper
and hash chain. A database written by that release holds rows like these; every later release must
load, replay and verify them. Never regenerate: they are what that release wrote."""

from __future__ import annotations

STREAM_ID = "93f04fd6-fc26-4ba9-9e49-62c614f8034a"

# (version, type, data, hash hex); the card: credited 100.00, debited 30.50 (settled 20.00, 15.00 of it
# cancelled), debited 7.00 and that hold voided: balance 84.50 USD.
EVENTS = [
    (
        1,
        "ledger.domain.giftcard:GiftCard.Issued",
        '{"caption":"Release","code_tail":"4242","currency":"USD","emission_date":"2025-02-28T12:00:00+00:00","expiring_date":"2026-03-01T12:00:00+00:00","issued_at":"2025-03-01T12:00:00+00:00","multiple_credits":true,"multiple_redemptions":true,"originator_topic":"ledger.domain.giftcard:GiftCard","profile_id":"shopper@example.com","relation_name":"release-card","restricted_to_owner":false,"timestamp":"2026-12-06T23:18:37.481643Z"}',
        "a48f68eb61b2772a30965e90424e5e37ae0076a09102c914bf97e5ee639ff652",
    ),
    (
        2,
        "ledger.domain.giftcard:GiftCard.Credited",
        '{"date":"2025-03-01T12:00:00+00:00","description":"load","order_info":{"orderId":"o-1"},"request_id":"r1","timestamp":"2026-12-06T23:18:37.481775Z","transaction_id":"t-credit","value":10000}',
        "15c1c288720ca9172dc522697c30f133960aa530e0df59fd5bb3e26560d5626d",
    ),
    (
        3,
        "ledger.domain.giftcard:GiftCard.Debited",
        '{"date":"2025-03-01T12:01:00+00:00","description":"order","order_info":null,"request_id":"r2","timestamp":"2026-12-06T23:18:37.481896Z","transaction_id":"t-debit","value":3050}',
        "1d1ad6d046b06a28aeeeb481ba8c626821d7ca9e3734754538f602b12e67da84",
    ),
    (
        4,
        "ledger.domain.giftcard:GiftCard.Settled",
        '{"date":"2025-03-01T12:02:00+00:00","oid":"s-1","request_id":"r3","timestamp":"2026-12-06T23:18:37.481960Z","transaction_id":"t-debit","value":2000}',
        "36ec70e72dc0b163cb3883667114f1426aa5a10fa3375172497bdeee035255eb",
    ),
    (
        5,
        "ledger.domain.giftcard:GiftCard.Cancelled",
        '{"date":"2025-03-01T12:03:00+00:00","oid":"c-1","refunded":450,"released":1050,"request_id":"r4","timestamp":"2026-12-06T23:18:37.482028Z","transaction_id":"t-debit","value":1500}',
        "22ebbf5b20d51be16da25f271ac54ed31ee94bf6dddac2b8060538a3c21d10fe",
    ),
    (
        6,
        "ledger.domain.giftcard:GiftCard.Debited",
        '{"date":"2025-03-01T12:04:00+00:00","description":"held","order_info":null,"request_id":"r5","timestamp":"2026-12-06T23:18:37.482068Z","transaction_id":"t-held","value":700}',
        "9f6bb924c3378d9ed05412143fbbf39f107aca0cc26fff95967b8be28b7f559b",
    ),
    (
        7,
        "ledger.domain.giftcard:GiftCard.Voided",
        '{"date":"2025-03-09T12:00:00+00:00","oid":"v-1","refunded":0,"released":700,"request_id":"hold-expired","timestamp":"2026-12-06T23:18:37.482113Z","transaction_id":"t-held","value":700}',
        "94e2b392db75967307234098a3e8c1b9d773995b571ca9ffac62c86aad4ddc1f",
    ),
]

# The snapshot that release took at version 7 (MessagePack, schema 1: fields copied by hand, no tag).
SNAPSHOT_VERSION = 7
SNAPSHOT_STATE = bytes.fromhex(
    "de0012a26964d92439336630346664362d666332362d346261392d396534392d363263363134663830333461a7766572"
    "73696f6e07aa637265617465645f6f6ed7ff72d527e06b15ed4dab6d6f6469666965645f6f6ed7ff72f1d7a06b15ed4d"
    "ad72656c6174696f6e5f6e616d65ac72656c656173652d63617264a763617074696f6ea752656c65617365aa70726f66"
    "696c655f6964b373686f70706572406578616d706c652e636f6da863757272656e6379a3555344ad656d697373696f6e"
    "5f64617465d6ff67c1a540ad6578706972696e675f64617465d6ff69a42a40b3726573747269637465645f746f5f6f77"
    "6e6572c2b06d756c7469706c655f63726564697473c3b46d756c7469706c655f726564656d7074696f6e73c3a9636f64"
    "655f7461696ca434323432a96973737565645f6174d6ff67c2f6c0a762616c616e6365cd2102ac7472616e7361637469"
    "6f6e7383a8742d6372656469749ca8742d637265646974a6437265646974cd2710a46c6f6164a27231b9323032352d30"
    "332d30315431323a30303a30302b30303a30300000009090c0a7742d64656269749ca7742d6465626974a54465626974"
    "cd0beaa56f72646572a27232b9323032352d30332d30315431323a30313a30302b30303a3030cd07d0cd041acd01c291"
    "94a3732d31cd07d0b9323032352d30332d30315431323a30323a30302b30303a3030a272339194a3632d31cd05dcb932"
    "3032352d30332d30315431323a30333a30302b30303a3030a27234c0a6742d68656c649ca6742d68656c64a544656269"
    "74cd02bca468656c64a27235b9323032352d30332d30315431323a30343a30302b30303a303000cd02bc00909194a376"
    "2d31cd02bcb9323032352d30332d30395431323a30303a30302b30303a3030ac686f6c642d65787069726564b9323032"
    "352d30332d30395431323a30303a30302b30303a3030ab726571756573745f69647385ae7472616e73616374696f6e3a"
    "723193ac4372656469747c3130303030a8742d637265646974c0ae7472616e73616374696f6e3a723293aa4465626974"
    "7c33303530a7742d6465626974c0b5736574746c656d656e743a742d64656269743a723393a432303030a7742d646562"
    "6974a3732d31b763616e63656c6c6174696f6e3a742d64656269743a723493a431353030a7742d6465626974a3632d31"
    "ae7472616e73616374696f6e3a723593a944656269747c373030a6742d68656c64c0"
)
