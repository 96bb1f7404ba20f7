"""What every benchmark does with its figures besides printing them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path | None, figures: Any) -> None:
    """Keeps the figures as JSON when ``--json`` names a file (the suite reads them from there)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
