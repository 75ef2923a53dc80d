"""Small helpers shared by the analysis modules (no torch)."""

from __future__ import annotations

import contextlib
import math
import random
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from connectome.errors import ConnectomeError, EmptyGraphError
from connectome.graph import Connectome

if TYPE_CHECKING:  # pragma: no cover
    import igraph

# One bare igraph topology per Connectome. Connectomes are immutable (their edge arrays are
# read-only), so the topology never goes stale; entries vanish with the graph.


def nan_to_none(x: Any) -> Any:
    """JSON-ready: non-finite floats become None, recursively through dicts, lists and tuples."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    return x


def finish_correlation(c: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """A correlation matrix made exact where it is known: ``c`` clipped to [-1, 1], NaN rows and
    columns where ``bad`` (a constant profile), 1 on the other diagonal entries, symmetric and
    read-only. ``c`` is modified in place and returned."""
    c = np.clip(c, -1.0, 1.0, out=c)
    c[bad, :] = np.nan
    c[:, bad] = np.nan
    idx = np.flatnonzero(~bad)
    c[idx, idx] = 1.0
    c = (c + c.T) / 2
    c.setflags(write=False)
    return c


def topology(g: Connectome) -> igraph.Graph:
    """The directed igraph graph of ``g``'s edges, no attributes; vertex ``i`` is node ``i``,
    edge ``e`` is edge ``e`` of ``g``. One cache for the package: :mod:`connectome._igraph`.
    Callers must not modify the returned graph."""
    from connectome._igraph import topology as cached

    return cached(g)


@contextlib.contextmanager
def seeded_igraph(seed: int) -> Iterator[None]:
    """igraph draws from a private ``random.Random(seed)`` inside the block.

    python-igraph's default generator is the ``random`` module, restored afterwards; the
    global ``random`` state is left untouched.
    """
    import igraph as ig

    ig.set_random_number_generator(random.Random(seed))
    try:
        yield
    finally:
        ig.set_random_number_generator(random)


def check_nonempty(g: Connectome, what: str) -> None:
    """A TypeError unless ``g`` is a Connectome, an EmptyGraphError if it has no nodes."""
    if not isinstance(g, Connectome):
        raise TypeError(f"{what} takes a Connectome, got {type(g).__name__}")
    if g.num_nodes == 0:
        raise EmptyGraphError(f"{what} needs a graph with at least one node; this one has none")


def edge_values(g: Connectome, weight: str) -> np.ndarray:
    """Edge column ``weight`` as float64, checked finite."""
    w = np.asarray(g.edge_attr(weight), dtype=np.float64)
    if w.size and not np.all(np.isfinite(w)):
        bad = int(np.flatnonzero(~np.isfinite(w))[0])
        raise ConnectomeError(
            f"edge column {weight!r} holds {int((~np.isfinite(w)).sum())} non-finite values "
            f"(first at edge {bad}: {g.node_ids[g.src[bad]]} -> {g.node_ids[g.dst[bad]]}); "
            "drop or fix those edges before computing centralities"
        )
    return w


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
