"""This package's version, and the versions a graph's ``meta`` records."""

from __future__ import annotations

__version__ = "0.1.0"  # pyproject.toml's version


def versions() -> dict[str, str]:
    """``{"connectome": ..., "torch": ...}``: what made a graph, for its ``meta["versions"]``."""
    import torch  # only extraction records versions, and it has torch loaded already

    return {"connectome": __version__, "torch": torch.__version__}
