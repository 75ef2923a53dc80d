"""Read a Connectome the way connectomics reads a brain.

Graph functions (centrality, communities, nulls, circuits, comparison, isomorphism) take a
Connectome and never import torch; the functions that run a model (ablation, unit
matching, activation comparison) import it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    # centrality.py
    "centrality": "centrality",
    "strength": "centrality",
    "top_nodes": "centrality",
    # communities.py
    "communities": "communities",
    "resolution_sweep": "communities",
    "Partition": "communities",
    # nulls.py
    "null_models": "nulls",
    "significance": "nulls",
    "hub_roles": "nulls",
    "rich_club": "nulls",
    "motif_counts": "nulls",
    # circuits.py
    "circuit": "circuits",
    "neuron_groups": "circuits",
    "top_contributors": "circuits",
    # compare.py
    "compare": "compare",
    "compare_categories": "compare",
    # isomorphism.py
    "find_analogous": "isomorphism",
    # matching.py (runs models)
    "match_units": "matching",
    "universality": "matching",
    # ablation.py (runs models)
    "ablate": "ablation",
    "fidelity": "ablation",
    # activations.py (runs models)
    "compare_activations": "activations",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        mod = importlib.import_module(f"connectome.analysis.{_WHERE[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module 'connectome.analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
