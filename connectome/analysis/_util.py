"""Small helpers shared by the analysis modules (no torch)."""

from __future__ import annotations

import math
from typing import Any


def nan_to_none(x: Any) -> Any:
    """JSON-ready: non-finite floats become None, recursively through dicts, lists and tuples."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    return x
