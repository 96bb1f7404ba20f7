"""Gift card providers for tests: real aiohttp apps served on loopback.

- ``reference``: a well-behaved external provider (all 11 Provider Protocol operations, in memory).
- ``faulty``: the same provider behind switchable faults (slow, 500, bad JSON, wrong shape, reset).
- ``serving``: start any aiohttp app on 127.0.0.1 with an ephemeral port.
"""
