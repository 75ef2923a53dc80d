"""A graph made safe to show: names and ``meta`` text with control characters as visible escapes."""

from __future__ import annotations

from typing import Any

from connectome._text import printable
from connectome.graph import Connectome

__all__ = ["for_display"]


def _printable_json(v: Any) -> Any:
    if isinstance(v, str):
        return printable(v)
    if isinstance(v, dict):
        return {k: _printable_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_printable_json(x) for x in v]
    return v


def for_display(g: Connectome) -> Connectome:
    """``g`` with unit labels and ``meta`` made :func:`~connectome._text.printable`: control
    characters shown as escapes, non-UTF-8 bytes of folder names as U+FFFD. The example
    image paths (``meta["examples"]``) are kept as they are: they are read, not shown."""
    for l in g.layers:
        if l.labels is not None and any(printable(s) != s for s in l.labels):
            g = g.with_labels(l.name, [printable(s) for s in l.labels])
    meta = {k: v if k == "examples" else _printable_json(v) for k, v in g.meta.items()}
    return g if meta == g.meta else g.with_meta(**meta)
