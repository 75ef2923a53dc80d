"""One bare igraph topology per edge structure, shared by the converters and the analyses.

Building an igraph graph from Python costs about as much as one pass of the slower igraph
algorithms on it (for ResNet-50's 15.5M edges, tens of seconds: the edge list has to go
through Python ints), while copying a built one is a C ``memcpy``. The graphs of one model
(every category's attribution graph, ``with_node_attrs`` copies, annotated graphs) share
their ``src``/``dst`` arrays or hold equal ones, so one topology serves them all.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import igraph

    from connectome.graph import Connectome

__all__ = ["topology", "edge_topology", "clear"]

#: Topologies kept; older ones are dropped first (each is ~32 bytes per edge in igraph).
MAX_CACHED = 3
#: Edges handed to igraph per chunk while building.
CHUNK = 1 << 20

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
    with _lock:
        _cache[:] = [e for e in _cache if e[0]() is not None and e[1]() is not None]
        G = _lookup(g.src, g.dst, g.num_nodes)
        if G is not None:
            return G
    G = _build(g.num_nodes, g.src, g.dst)
    with _lock:
        _cache.append((weakref.ref(g.src), weakref.ref(g.dst), g.num_nodes, G))
        del _cache[:-MAX_CACHED]
    return G


def _build(n: int, src: np.ndarray, dst: np.ndarray) -> igraph.Graph:
    """igraph graph with edges ``src[e] -> dst[e]`` in order.

    igraph takes edges as Python int pairs. Fed from a generator over chunks, only a chunk
    of them exists at a time: a third of the memory of a materialised list of pairs (1.1 GB
    for 6M edges), at the same speed (zip of flat ``tolist()`` chunks is several times
    faster than an (m, 2) array or nested list).
    """
    import igraph as ig

    step = CHUNK
    pairs = itertools.chain.from_iterable(
        zip(src[a : a + step].tolist(), dst[a : a + step].tolist()) for a in range(0, src.size, step)
    )
    return ig.Graph(n=n, edges=pairs, directed=True)


# One topology of a graph's edges with non-zero weight, per graph (weights differ between
# graphs of one model, so their zero edges do too). Centralities and Leiden use it: a zero
# edge carries nothing, and attribution graphs have many (38% on ResNet-50: dead units).
_nonzero: weakref.WeakKeyDictionary[Any, tuple[bytes, Any]] = weakref.WeakKeyDictionary()


def edge_topology(g: Connectome, keep: np.ndarray) -> igraph.Graph:
    """The igraph graph of ``g``'s edges where ``keep`` (bool, shape (n_edges,)) holds.

    Edge ``i`` of the result is the ``i``-th kept edge of ``g``, so ``weights[keep]`` index it.
    The whole topology when every edge is kept; otherwise built from the arrays (no
    ``subgraph_edges`` copy of a larger graph) and remembered for ``g`` and this ``keep``.
    Callers must not modify it.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.all():
        return topology(g)
    digest = hashlib.blake2b(np.packbits(keep).tobytes(), digest_size=16).digest()
    with _lock:
        hit = _nonzero.get(g)
        if hit is not None and hit[0] == digest:
            return hit[1]
    G = _build(g.num_nodes, g.src[keep], g.dst[keep])
    with _lock:
        _nonzero[g] = (digest, G)
    return G


def clear() -> None:
    """Forget every cached topology (frees their memory)."""
    with _lock:
        _cache.clear()
        _nonzero.clear()
