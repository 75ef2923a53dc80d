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


def progress_bar(total: int, desc: str, show: bool | None, heavy: bool) -> Any:
    """A tqdm bar on stderr, or ``None``.

    ``show=None`` leaves the choice to ``heavy`` (the caller's estimate that the work takes
    more than a few seconds), so small graphs stay silent and big ones say where they are.
    """
    if not (heavy if show is None else show):
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
