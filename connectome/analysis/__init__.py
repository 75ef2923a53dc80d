"""Read a Connectome the way connectomics reads a brain.

Graph functions (centrality, communities, nulls, circuits, comparison, isomorphism) take a
Connectome and never import torch; they are imported here directly (several share their
module's name, and a lazily imported submodule would shadow its function). The functions
that run a model (ablation, unit matching, activation comparison) import torch, so they load
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from connectome.analysis.annotate import annotate
from connectome.analysis.centrality import MEASURES, centrality, default_measures, strength, top_nodes
from connectome.analysis.circuits import GroupGraph, circuit, neuron_groups, relative_depth, top_contributors
from connectome.analysis.circuits import flow_share
from connectome.analysis.communities import Community, Partition, ResolutionSweep, SweepRow, communities, resolution_sweep
from connectome.analysis.compare import CategoryCorrelation, Comparison, LayerComparison, compare, compare_categories
from connectome.analysis.faithfulness import CategoryFaithfulness, FaithfulnessResult, faithfulness
from connectome.analysis.isomorphism import Match, MatchList, find_analogous
from connectome.analysis.nulls import NullStat, Significance, hub_roles, motif_counts, null_models, rich_club, significance
from connectome.analysis.trajectory import Trajectory, trajectory

_LAZY = {
    # matching.py (runs models)
    "match_units": "matching",
    "universality": "matching",
    "UnitMatching": "matching",
    # ablation.py (runs models)
    "ablate": "ablation",
    "fidelity": "ablation",
    # activations.py (runs models)
    "compare_activations": "activations",
    # functional.py (runs models; coupling compares graphs)
    "functional_connectivity": "functional",
    "FunctionalConnectivity": "functional",
    "coupling": "functional",
    "Coupling": "functional",
    # lesion.py (runs models)
    "lesion_curve": "lesion",
    "lesion_edges": "lesion",
    "LesionCurve": "lesion",
}

__all__ = sorted([
    "annotate",
    "centrality", "strength", "top_nodes", "GroupGraph", "circuit", "neuron_groups", "relative_depth",
    "top_contributors", "flow_share", "Partition", "communities", "resolution_sweep", "CategoryCorrelation", "Comparison",
    "LayerComparison", "compare", "compare_categories", "Match", "MatchList", "find_analogous", "hub_roles",
    "motif_counts", "null_models", "rich_club", "significance", "MEASURES", "default_measures", "Community",
    "ResolutionSweep",
    "SweepRow", "NullStat", "Significance", "Trajectory", "trajectory", *_LAZY,
    "faithfulness", "FaithfulnessResult", "CategoryFaithfulness",
])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod = importlib.import_module(f"connectome.analysis.{_LAZY[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module 'connectome.analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
