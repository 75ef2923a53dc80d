"""Write analysis results back onto the graph, so that they travel to GraphML, GEXF and Gephi."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from connectome.errors import ConnectomeError
from connectome.graph import Connectome

__all__ = ["annotate"]


def annotate(
    g: Connectome,
    *,
    centrality: Mapping[str, np.ndarray] | None = None,
    partition: Any = None,
    roles: Mapping[str, np.ndarray] | None = None,
    circuit: Connectome | None = None,
) -> Connectome:
    """A new graph carrying analysis results as node attributes.

    Parameters
    ----------
    g : Connectome
    centrality : dict of str -> ndarray, optional
        As returned by :func:`~connectome.analysis.centrality`; stored as ``centrality_<name>``,
        and how betweenness was computed as ``meta["centrality"]["betweenness_samples"]``
        (``None``: exact).
    partition : Partition, optional
        Stored as ``community`` (GraphML/GEXF colour nodes by it).
    roles : dict, optional
        As returned by :func:`~connectome.analysis.hub_roles`; numeric entries stored as
        ``role_<name>`` and the role label as ``role`` codes 0..3 (see ``meta["roles"]``).
    circuit : Connectome, optional
        A circuit of ``g``; stored as ``in_circuit`` (1.0 for its units, else 0.0).

    Returns
    -------
    Connectome

    Examples
    --------
    >>> from connectome import analysis as an                     # doctest: +SKIP
    >>> g2 = an.annotate(g, centrality=an.centrality(g), partition=an.communities(g))  # doctest: +SKIP
    >>> cn.io.write_graphml(g2, "g.graphml")                      # doctest: +SKIP
    """
    attrs: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for name, v in (centrality or {}).items():
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (g.num_nodes,):
            raise ConnectomeError(f"centrality {name!r} has shape {v.shape}; expected ({g.num_nodes},), one per node")
        attrs[f"centrality_{name}"] = v
    if centrality is not None and "betweenness" in centrality:
        # an estimate must say so where it travels (Gephi shows the graph's meta)
        meta["centrality"] = {"betweenness_samples": getattr(centrality, "betweenness_samples", None)}
    if partition is not None:
        g = partition.to_node_attr(g)
    if roles is not None:
        for name, v in roles.items():
            v = np.asarray(v)
            if v.dtype.kind in "fiu":
                attrs[f"role_{name}"] = v.astype(np.float64)
            else:
                labels = sorted(set(v.tolist()))
                attrs["role"] = np.array([labels.index(x) for x in v.tolist()], dtype=np.int64)
                meta["roles"] = labels
    if circuit is not None:
        attrs["in_circuit"] = np.isin(g.node_ids, circuit.node_ids).astype(np.float64)
    out = g.with_node_attrs(**attrs) if attrs else g
    return out.with_meta(**meta) if meta else out
