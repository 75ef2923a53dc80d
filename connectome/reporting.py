"""Reports: analysis + figures for one graph or a pair, as terminal text, JSON and HTML.

The CLI's ``report`` and ``compare`` commands and the demo are thin layers over these.
Graph analysis only: nothing here runs a model.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np


from connectome.errors import ConnectomeError
from connectome.graph import Connectome
from connectome.kinds import is_hidden
from connectome.viz.display import for_display

__all__ = ["ReportResult", "graph_report", "compare_report", "graph_sections", "table"]


@dataclass
class ReportResult:
    text: str
    data: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain-text table (right-aligned numbers, 4 significant digits)."""
    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in cells:
        out.append("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@contextmanager
def _plain_text() -> Iterator[None]:
    """Matplotlib text drawn as written: a category called ``$\\foo$`` is a name, not mathtext
    (which would fail to parse, or silently draw something else)."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        yield


#: Circuit units a report draws at most (``circuit(..., max_units=)``): readable on ResNet-50.
FIGURE_UNITS = 150
#: Layers (from the output back) of the circuit skeleton placed in the other graph.
ANALOGOUS_LAYERS = 8


def graph_sections(g: Connectome, top: int = 10, seed: int = 0, report: Any = None, prefix: str = "",
                   mass: float = 0.8, top_k: int | None = None, max_units: int | None = FIGURE_UNITS,
                   measures: list[str] | None = None, betweenness_samples: Any = "auto",
                   images: Any = None, max_cards: int = 24) -> dict[str, Any]:
    """Hubs, communities, circuit and neuron groups of one graph; adds figures to ``report``.

    ``mass``/``top_k``/``max_units`` choose the circuit (see
    :func:`connectome.analysis.circuit`; ``max_units`` keeps its figure readable), ``measures``
    the centralities computed (default strength, pagerank and flow when the graph has
    attribution), ``betweenness_samples`` how betweenness is computed when asked for.

    When the graph carries dataset examples (``examples=k`` at extraction) the report also
    gets a card per circuit unit and per top contributor, with its top image patches;
    ``images`` is the data they index (default: the files or data spec in ``meta``).

    Returns a JSON-able dict with the results and a ``text`` entry for the terminal.
    """
    from connectome import analysis as an

    g = for_display(g)
    data: dict[str, Any] = {"graph": {"layers": [[l.name, l.kind, l.size] for l in g.layers],
                                      "num_nodes": g.num_nodes, "num_edges": g.num_edges,
                                      "meta": g.meta}}
    text: list[str] = [repr(g), ""]
    # hubs
    if measures is None:
        measures = an.default_measures(g, betweenness=False)
    measures = list(dict.fromkeys([*measures, "pagerank"]))  # the hub table ranks by pagerank too
    c = an.centrality(g, measures, betweenness_samples=betweenness_samples, seed=seed)
    if "betweenness" in c:
        data["betweenness_samples"] = c.betweenness_samples
    key = next(k for k in ("flow", "strength", *c) if k in c)
    hidden = np.isin(g.node_layer, [i for i, l in enumerate(g.layers) if is_hidden(l.kind)])
    # NaN marks units that are not hidden: top_nodes leaves NaN out
    scores = np.where(hidden, np.abs(c[key]), np.nan)
    hubs = an.top_nodes(g, scores, k=top)
    pr = an.top_nodes(g, np.where(hidden, c["pagerank"], np.nan), k=top)
    data["hubs"] = {"by": key, "top": hubs, "pagerank": pr}
    text.append(f"Top {top} hidden units by |{key}|:")
    text.append(table([[n, s, p[0], p[1]] for (n, s), p in zip(hubs, pr)], [f"unit (|{key}|)", "score", "unit (pagerank)", "score"]))
    # communities
    try:
        p = an.communities(g, method="modularity", seed=seed)
    except ConnectomeError as exc:  # e.g. a graph with no (non-zero) edges: report the rest
        p = None
        text.append(f"\nLeiden communities: skipped ({exc})")
    g_comm, comm_table = g, None
    if p is not None:
        data["communities"] = {"objective": p.objective, "quality": p.quality, "n": p.n_communities,
                               "sizes": p.sizes().tolist()[:20]}
        g_comm = p.to_node_attr(g)
        text.append("")
        text.append(f"Leiden communities: {p.n_communities} ({p.objective}, quality {p.quality:.4f}); "
                    f"largest sizes {p.sizes().tolist()[:8]}")
        rows = []
        for com in p.communities[: min(8, len(p.communities))]:
            span = com.layers[0] if len(com.layers) == 1 else f"{com.layers[0]} .. {com.layers[-1]}"
            rows.append([com.label, com.size, span, com.internal_flow, ", ".join(com.top_units[:3])])
        comm_table = (rows, ["community", "units", "layers", "internal flow", "top units"])
        text.append(table(*comm_table))
        if len(rows) < p.n_communities:
            text.append(f"(the {len(rows)} largest of {p.n_communities} communities)")
    # circuit
    from connectome.analysis.circuits import has_target

    circ = groups = None
    if has_target(g):
        circ = an.circuit(g_comm, mass=mass, top_k=top_k, max_units=max_units)
        sizes = {l.name: l.size for l in circ.layers}
        capped = circ.meta["circuit"].get("capped", {})
        data["circuit"] = {"mass": None if top_k else mass, "top_k": top_k, "max_units": max_units,
                           "units": circ.num_nodes, "edges": circ.num_edges, "sizes": sizes, "capped": capped}
        how = f"the top {top_k} units per layer" if top_k else f"{mass:.0%} of the flow per layer"
        circ_desc = how + (f", at most about {max_units} units" if capped else "")
        if capped:
            how += (f", capped at about {max_units} units ({len(capped)} layers trimmed to their strongest; "
                    "--max-units 0 for no cap)")
        text.append("")
        text.append(f"Circuit carrying {how} into {circ.layers[-1].labels[0] if circ.layers[-1].labels else circ.node_ids[-1]}: "
                    f"{circ.num_nodes} units, {circ.num_edges} edges")
        text.append(table([[k, v, g.layer(k).size] for k, v in sizes.items()], ["layer", "circuit units", "of"]))
        contrib = an.top_contributors(g, k=min(top, 10))
        data["top_contributors"] = contrib
        text.append("")
        text.append("Previous-layer units that contributed most to the class:")
        text.append(table([[n, v] for n, v in contrib], ["unit", "flow"]))
        try:
            groups = an.neuron_groups(circ)
            data["neuron_groups"] = {k: v for k, v in groups.members.items()}
        except Exception as exc:  # a circuit too small to group is not an error of the report
            warnings.warn(f"neuron groups skipped: {exc}", stacklevel=2)
    if report is not None:
        from connectome import viz

        name = g.meta.get("category") or g.meta.get("model") or "graph"
        report.add_heading(f"{prefix}{name}", 2)
        report.add_code(repr(g))
        # NaN (input and output units) leaves those layers out of the hub chart
        with _plain_text():
            report.add_figure(viz.plot_hubs(g_comm, scores if np.isfinite(scores).any() else c["pagerank"], k=5,
                                            title=f"Top hidden units by |{key}| per layer", xlabel=f"|{key}|"),
                              f"Hubs of {name}: the units with the largest |{key}| in each hidden layer.",
                              f"{prefix}hubs_{_slug(name)}")
        if comm_table is not None:
            shown = len(comm_table[0])
            of = f"the {shown} largest of {p.n_communities} communities" if shown < p.n_communities else \
                f"all {p.n_communities} communities"
            report.add_table(comm_table[0], headers=comm_table[1],
                             caption=f"Leiden communities ({p.objective}, quality {p.quality:.3f}): {of}")
        if circ is not None:
            with _plain_text():
                report.add_figure(viz.plot_circuit(circ, title=f"Circuit of {name} ({circ_desc})"),
                                  f"The layered circuit of {name}: units sized by attribution, coloured by community; "
                                  "edges red for positive and blue for negative flow.", f"{prefix}circuit_{_slug(name)}")
                if groups is not None:
                    report.add_figure(viz.plot_groups(groups.graph, groups.members, title=f"Neuron groups of {name}"),
                                      "The circuit's units grouped per layer by where their flow goes and comes from; "
                                      "arrows carry the summed flow between groups.", f"{prefix}groups_{_slug(name)}")
            _add_cards(report, g_comm, circ, data.get("top_contributors", []), images, name, max_cards)
    data["text"] = "\n".join(text)
    data["_circuit"] = circ
    data["_partition"] = p
    return data


def _add_cards(report: Any, g: Connectome, circ: Connectome, contrib: list[Any], images: Any, name: str,
               max_cards: int) -> None:
    """Unit cards of the circuit's hidden units and of the top contributors, when ``g`` has examples."""
    from connectome.patches import has_examples, image_source
    from connectome.viz.units import unit_cards

    if not has_examples(g):
        return
    try:
        source = image_source(g, images)
    except (ConnectomeError, OSError, TypeError, ValueError) as exc:
        warnings.warn(f"unit cards without patches: {exc}", stacklevel=3)
        source = None
    if source is None:
        report.add_text("The graph carries dataset examples but not the images they index: pass the data "
                        "(report(..., images=data), or --data on the command line) to see the patches.")
    attr = np.abs(np.asarray(circ.node_attrs.get("attribution", np.zeros(circ.num_nodes)), dtype=np.float64))
    hidden = [i for i in range(circ.num_nodes) if is_hidden(circ.layers[int(circ.node_layer[i])].kind)]
    order = sorted(hidden, key=lambda i: (int(circ.node_layer[i]), -attr[i]))[:max_cards]
    try:
        cards = unit_cards(g, [str(circ.node_ids[i]) for i in order], source)
        report.add_cards(cards, f"What the circuit's units respond to: each unit's top images by maximum activation "
                                f"in {name}, cropped to its receptive field, best first.")
        if contrib:
            report.add_cards(unit_cards(g, [n for n, _ in contrib], source),
                             "The previous-layer units that contributed most to the class, with their top patches.")
    except (ConnectomeError, OSError) as exc:  # images gone since the extraction: the report goes on
        warnings.warn(f"unit cards skipped: {exc}", stacklevel=3)


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(s))[:40]


def graph_report(g: Connectome, top: int = 10, out: str | None = None, seed: int = 0, mass: float = 0.8,
                 top_k: int | None = None, max_units: int | None = FIGURE_UNITS, measures: list[str] | None = None,
                 betweenness_samples: Any = "auto", images: Any = None, viewer: bool = False) -> ReportResult:
    """Analyse one graph; with ``out``, also write ``report.html`` and PNGs there (and, with
    ``viewer``, the interactive ``viewer.html``). ``images``: the data its examples index.

    The circuit and centrality options are those of :func:`graph_sections`.
    """
    g = for_display(g)
    rep = None
    if out is not None:
        from connectome.viz import Report

        rep = Report(f"connectome report: {g.meta.get('model', '')} {g.meta.get('category') or ''}".strip())
    data = graph_sections(g, top=top, seed=seed, report=rep, mass=mass, top_k=top_k, max_units=max_units,
                          measures=measures, betweenness_samples=betweenness_samples, images=images)
    path = str(rep.write(out)) if rep is not None else None
    if viewer:
        from pathlib import Path

        from connectome.viz.viewer import write_viewer

        if out is None:
            raise ConnectomeError("the viewer is written next to the report: give an output folder (--out DIR)")
        data["viewer"] = str(write_viewer(g, Path(out) / "viewer.html", images=images))
    text = data.pop("text")
    data.pop("_circuit")
    data.pop("_partition")
    return ReportResult(text=text, data=data, path=path)


def compare_report(ga: Connectome, gb: Connectome, top: int = 20, out: str | None = None, mass: float = 0.8,
                   time_budget: float = 5.0) -> ReportResult:
    """Compare two graphs of one model: overlaps per layer, shared units, analogous wiring.

    ``mass`` is that of the circuits compared; ``time_budget`` (seconds) bounds the search
    for the skeleton of A's circuit (its last ``ANALOGOUS_LAYERS`` layers) in B's graph.
    """
    from connectome import analysis as an

    ga, gb = for_display(ga), for_display(gb)
    cmp = an.compare(ga, gb, top=top, mass=mass)
    d = cmp.to_dict()
    text = [repr(cmp)]
    na, nb = ga.meta.get("category") or "A", gb.meta.get("category") or "B"
    analog = None
    from connectome.analysis.circuits import has_target

    if has_target(ga) and has_target(gb):
        by = "abs_weight" if "abs_weight" in ga.edge_attrs and "abs_weight" in gb.edge_attrs else "weight"
        # a sparse pattern (each circuit unit's strongest input) into a host that keeps more
        skeleton = an.circuit(ga, top_k=2).prune(top_k=1, by=by)
        pattern = skeleton.layer_subgraph(skeleton.layer_names[-ANALOGOUS_LAYERS:])
        host = gb.prune(top_k=8, by=by)
        try:
            analog = an.find_analogous(pattern, host, max_matches=5, time_budget=time_budget)
            d["analogous"] = [{"mapping": m.mapping, "score": m.score} for m in analog]
            text.append("")
            text.append(f"Analogous circuits: {len(analog)} placement(s) of the skeleton of {na}'s top-2 circuit "
                        f"(last {len(pattern.layers)} layers, {pattern.num_nodes} units) in {nb}'s graph; best score "
                        + (f"{analog[0].score:.3f}" if len(analog) else "n/a")
                        + ("" if analog.complete or analog.stopped_by != "time_budget"
                           else f" (search stopped at --time-budget {time_budget:g} s)"))
        except Exception as exc:
            text.append(f"Analogous circuits: search skipped ({exc})")
    path = None
    if out is not None:
        from connectome import viz

        rep = viz.Report(f"connectome compare: {na} vs {nb}")
        with _plain_text():  # category names are text, never mathtext
            rep.add_figure(viz.plot_comparison(cmp, analog), f"{na} vs {nb} per layer: similarities, the important "
                           "units they share, and where the skeleton of one's circuit lands in the other's graph.",
                           "comparison")
        rep.add_code(repr(cmp))
        if analog is not None and len(analog):
            best = analog[0]
            rep.add_table([[k, v, "same unit" if k == v else "analogous"] for k, v in best.mapping.items()],
                          headers=[f"unit of {na}'s circuit", f"placed on unit of {nb}", ""],
                          caption=f"Best analogous placement of {na}'s circuit skeleton in {nb} "
                                  f"(weight agreement {best.score:.3f}; {len(analog)} placement(s) found)")
        path = str(rep.write(out))
    return ReportResult(text="\n".join(text), data=d, path=path)
