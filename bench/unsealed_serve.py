"""``giftcard`` with shoppers' personal data stored unsealed: the HTTP bench's ``ours-plain``, never a deployment.

Issue 24 bounds what sealing costs a Debit: ours over the same service with sealing off. The
service has no setting for that on purpose: one turned on by mistake would write personal data in
clear into an event table nothing may ever change. Importing this module swaps the service's
``PersonalData`` for one that seals nothing, in this process only (and in the processes
``giftcard serve`` spawns, which import it again as their main module); then it runs the
command line as usual::

    python -m bench.unsealed_serve serve --host 127.0.0.1 --port 8080
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import hub.app
from hub.cli import main
from ledger.postgres.personal_data import PersonalData


class UnsealedPersonalData(PersonalData):
    """Stores each personal field as it came; the rest as shipped (a card's owner is still named by
    a keyed hash in its lookup, and what was sealed before still opens)."""

    async def prepare(self, states: Iterable[Mapping[str, Any]]) -> None:
        await self._ready()  # the subject key, which naming an owner needs

    def sealed(self, state: dict[str, Any]) -> dict[str, Any]:
        return state


hub.app.PersonalData = UnsealedPersonalData

if __name__ == "__main__":
    sys.exit(main())
