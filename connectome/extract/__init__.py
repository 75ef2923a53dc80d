"""Model -> unit graph: weight connectomes and attribution flows (torch, GPU when present)."""

from __future__ import annotations

# Imported eagerly: `activations` is both a module and the function it holds, and a lazily
# imported submodule would shadow the function on the package.
from connectome.extract.activations import activations
from connectome.extract.dataset_examples import examples
from connectome.extract.flow import attribution, attribution_by_category, iter_attribution_by_category
from connectome.extract.ops import register_op, unregister_op
from connectome.extract.over_training import over_training
from connectome.extract.trace import trace_units
from connectome.extract.weights import weights

__all__ = ["weights", "attribution", "attribution_by_category", "iter_attribution_by_category", "activations",
           "examples", "trace_units", "over_training", "register_op", "unregister_op"]
