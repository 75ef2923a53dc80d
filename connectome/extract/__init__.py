"""Model -> unit graph: weight connectomes and attribution flows (torch, GPU when present)."""

from __future__ import annotations

from connectome.extract.weights import weights

__all__ = ["weights", "attribution", "attribution_by_category", "activations", "trace_units"]


def __getattr__(name: str):
    if name in ("attribution", "attribution_by_category"):
        from connectome.extract import flow

        return getattr(flow, name)
    if name == "activations":
        from connectome.extract.activations import activations

        return activations
    if name == "trace_units":
        from connectome.extract.trace import trace_units

        return trace_units
    raise AttributeError(f"module 'connectome.extract' has no attribute {name!r}")
