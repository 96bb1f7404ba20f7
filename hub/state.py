"""Typed application state shared by the handlers (aiohttp ``AppKey``s)."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from hub.config import Settings
from ledger.commands import Ledger

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
LEDGER = web.AppKey("ledger", Ledger)
