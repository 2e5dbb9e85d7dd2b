"""What every benchmark script does with its figures: one JSON object, to a file or
stdout (``bench/run.py`` reads it)."""

from __future__ import annotations

import json
from typing import Any


def emit(results: dict[str, Any], path: str | None) -> None:
    """Write ``results`` as one line of JSON to ``path``, or print it."""
    text = json.dumps(results)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
