"""One bare igraph topology per edge structure, shared by the converters and the analyses.

Building an igraph graph from Python costs about as much as one pass of the slower igraph
algorithms on it (for ResNet-50's 15.5M edges, tens of seconds: the edge list has to go
through Python ints), while copying a built one is a C ``memcpy``. The graphs of one model
(every category's attribution graph, ``with_node_attrs`` copies, annotated graphs) share
their ``src``/``dst`` arrays or hold equal ones, so one topology serves them all.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import igraph

    from connectome.graph import Connectome

__all__ = ["topology"]

#: Topologies kept; older ones are dropped first (each is ~32 bytes per edge in igraph).
MAX_CACHED = 3

_lock = threading.Lock()
# (weakref to src, weakref to dst, n_nodes, graph), most recently used last. Connectome edge
# arrays are read-only, so an entry never goes stale; it vanishes with its arrays.
_cache: list[tuple[Any, Any, int, Any]] = []


def _lookup(src: np.ndarray, dst: np.ndarray, n: int) -> Any:
    for i, (rs, rd, n0, G) in enumerate(_cache):
        s, d = rs(), rd()
        if s is None or d is None or n0 != n:
            continue
        same = (s is src and d is dst) or (
            s.shape == src.shape and np.array_equal(s, src) and np.array_equal(d, dst)
        )
        if same:
            _cache.append(_cache.pop(i))
            return G
    return None


def topology(g: Connectome) -> igraph.Graph:
    """The directed igraph graph of ``g``'s edges, without attributes; vertex ``i`` is node ``i``.

    Edge ``e`` of the igraph graph is edge ``e`` of ``g``, so arrays over ``g``'s edges index
    both. Cached (see the module docstring): callers must not modify it; take ``.copy()``.
    """
    import igraph as ig

    with _lock:
        _cache[:] = [e for e in _cache if e[0]() is not None and e[1]() is not None]
        G = _lookup(g.src, g.dst, g.num_nodes)
        if G is not None:
            return G
    # zip of two flat lists is several times faster than an (m, 2) array or nested list
    G = ig.Graph(n=g.num_nodes, edges=list(zip(g.src.tolist(), g.dst.tolist())), directed=True)
    with _lock:
        _cache.append((weakref.ref(g.src), weakref.ref(g.dst), g.num_nodes, G))
        del _cache[:-MAX_CACHED]
    return G


def clear() -> None:
    """Forget every cached topology (frees their memory)."""
    with _lock:
        _cache.clear()
