"""A self-contained HTML report: headings, text, tables, code and figures.

Figures are rendered to PNG when added (and closed, so a long report does not hold dozens
of open figures); :meth:`Report.write` embeds each as base64 in ``report.html`` and also
writes it beside the report as ``<name>.png``. Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from connectome.io import atomic_write

__all__ = ["Report", "plot_faithfulness", "add_faithfulness"]

_CSS = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; color: #222; line-height: 1.5; }
h1 { font-size: 1.8em; border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { font-size: 1.4em; margin-top: 1.8em; border-bottom: 1px solid #eee; }
h3 { font-size: 1.15em; margin-top: 1.4em; }
html { overflow-x: hidden; }
/* Figures may be wider than the text column, up to the window: a wide chart shown at the
   column's width would shrink its labels below legibility. */
figure { margin: 1.5em 0 1.5em -50vw; text-align: center; width: 100vw; position: relative; left: 50%; }
figure img { max-width: calc(100vw - 2.4em); height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; margin: .4em auto 0; max-width: 1060px; padding: 0 1.2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: .3em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; margin: 1em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .5em .7em; font-size: .85em; background: #fcfcfc; }
.card h4 { margin: 0 0 .3em 0; font-size: 1em; font-family: monospace; }
.card img { display: block; image-rendering: pixelated; margin-bottom: .3em; }
.card table { margin: 0; font-size: .95em; }
.card td { border: none; padding: 0 .6em 0 0; background: none !important; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: .8em; overflow-x: auto; font-size: .88em; }
"""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cell(v: Any) -> tuple[str, bool]:
    """Text of a table cell (floats to 4 significant digits) and whether it is numeric."""
    if v is None:
        return "", False
    if isinstance(v, bool):
        return str(v), False
    if isinstance(v, Integral):
        return str(int(v)), True
    if isinstance(v, Real):
        f = float(v)
        if math.isnan(f):
            return "nan", True
        return f"{f:.4g}", True
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy scalars
        return _cell(v.item())
    return str(v), False


def _write(path: Path, data: bytes) -> None:
    """Atomic write, with the permissions a plain ``open()`` gives (an overwritten file keeps its own)."""
    with atomic_write(path) as fh:
        fh.write(data)


def _md(text: str) -> str:
    """Markdown text where ``<``/``>``/``&`` are literal, not HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _safe_name(name: str) -> str:
    stem = name[:-4] if name.lower().endswith(".png") else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "figure"
    return stem[:80]


class Report:
    """A self-contained HTML report built piece by piece.

    Parameters
    ----------
    title : str
        Page title and top heading.

    Examples
    --------
    >>> rep = Report("toy")
    >>> rep.add_heading("Summary")
    >>> rep.add_text("Two units carry the flow.")
    >>> rep.add_table([["h:0", 0.123456], ["h:1", 2]], headers=["unit", "flow"])
    >>> "<table>" in rep.to_html()
    True
    """

    def __init__(self, title: str) -> None:
        self.title = str(title)
        self._items: list[tuple[str, Any]] = []
        self._names: set[str] = set()

    # ------------------------------------------------------------------ building
    def add_heading(self, text: str, level: int = 2) -> None:
        """Add a heading; ``level`` 1 to 6 (1 is the report title's level)."""
        level = int(level)
        if not 1 <= level <= 6:
            raise ValueError(f"heading level must be 1..6, got {level}")
        self._items.append(("heading", (level, str(text))))

    def add_text(self, text: str) -> None:
        """Add text; blank lines separate paragraphs. The text is escaped, never read as HTML."""
        paras = [p.strip() for p in re.split(r"\n\s*\n", str(text)) if p.strip()]
        self._items.append(("text", paras))

    def add_figure(self, fig: Any, caption: str = "", name: str | None = None, *, dpi: int = 110) -> str:
        """Render ``fig`` to PNG, keep it for the report, and close the figure.

        Parameters
        ----------
        fig : matplotlib.figure.Figure
        caption : str
            Shown under the image and used as its ``alt`` text.
        name : str, optional
            File name (without ``.png``) in the output folder; made safe and unique.
        dpi : int, default 110

        Returns
        -------
        str
            The file name the PNG will have, ``"<name>.png"``.
        """
        if not hasattr(fig, "savefig"):
            raise TypeError(f"add_figure expects a matplotlib Figure, got {type(fig).__name__}")
        stem = _safe_name(name if name is not None else f"figure-{sum(k == 'figure' for k, _ in self._items) + 1}")
        candidate, i = stem, 2
        while candidate in self._names:
            candidate, i = f"{stem}-{i}", i + 1
        self._names.add(candidate)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
        png = buf.getvalue()
        self._close(fig)
        file = f"{candidate}.png"
        self._items.append(("figure", (file, str(caption), png)))
        return file

    @staticmethod
    def _close(fig: Any) -> None:
        import sys

        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(fig)

    def add_table(self, rows: Iterable[Sequence[Any]], headers: Sequence[str] | None = None,
                  caption: str | None = None) -> None:
        """Add a table; floats are written with 4 significant digits.

        Parameters
        ----------
        rows : iterable of sequences
            One sequence of cell values per row.
        headers : sequence of str, optional
            Column names.
        caption : str, optional
        """
        body = [[_cell(v) for v in row] for row in rows]
        self._items.append(("table", ([str(h) for h in headers] if headers is not None else None, body,
                                      None if caption is None else str(caption))))

    def add_cards(self, cards: Sequence[dict[str, Any]], caption: str | None = None) -> None:
        """Add unit cards: per unit a title, a strip of image patches and a few fields.

        Parameters
        ----------
        cards : sequence of dict
            ``{"title": str, "png": bytes or None, "fields": [(name, value), ...]}``, as
            :func:`connectome.viz.units.unit_cards` makes them.
        caption : str, optional
            Text above the cards.
        """
        items = []
        for c in cards:
            png = c.get("png")
            if png is not None and not bytes(png).startswith(_PNG_SIGNATURE):
                raise ValueError(f"card {c.get('title')!r}: png must be PNG file bytes")
            items.append((str(c.get("title", "")), png, [(str(k), _cell(v)) for k, v in c.get("fields", [])]))
        self._items.append(("cards", (None if caption is None else str(caption), items)))

    def add_code(self, text: str) -> None:
        """Add preformatted text (a command line, a repr, a JSON summary)."""
        self._items.append(("code", str(text)))

    # ------------------------------------------------------------------ output
    def to_html(self) -> str:
        """The whole page as a string, figures embedded as base64 PNG."""
        e = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(self.title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{e(self.title)}</h1>",
        ]
        for kind, item in self._items:
            if kind == "heading":
                level, text = item
                out.append(f"<h{level}>{e(text)}</h{level}>")
            elif kind == "text":
                out.extend(f"<p>{e(p)}</p>" for p in item)
            elif kind == "figure":
                file, caption, png = item
                data = base64.b64encode(png).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}" data-file="{e(file)}">'
                    + (f"<figcaption>{e(caption)}</figcaption>" if caption else "")
                    + "</figure>"
                )
            elif kind == "table":
                headers, body, caption = item
                out.append("<table>")
                if caption:
                    out.append(f"<caption>{e(caption)}</caption>")
                if headers is not None:
                    out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead>")
                out.append("<tbody>")
                for row in body:
                    out.append("<tr>" + "".join(
                        f'<td class="num">{e(t)}</td>' if num else f"<td>{e(t)}</td>" for t, num in row
                    ) + "</tr>")
                out.append("</tbody></table>")
            elif kind == "code":
                out.append(f"<pre><code>{e(item)}</code></pre>")
            elif kind == "cards":
                caption, cards = item
                if caption:
                    out.append(f"<p>{e(caption)}</p>")
                out.append('<div class="cards">')
                for title, png, fields in cards:
                    img = ""
                    if png is not None:
                        img = (f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
                               f'alt="top image patches of {e(title)}">')
                    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(t)}</td></tr>" for k, (t, _) in fields)
                    out.append(f'<div class="card"><h4>{e(title)}</h4>{img}<table>{rows}</table></div>')
                out.append("</div>")
        out += ["</body>", "</html>", ""]
        return "\n".join(out)

    def to_markdown(self) -> str:
        """The report as Markdown; figures are linked as ``<name>.png`` (written by :meth:`write`)."""
        out = [f"# {_md(self.title)}", ""]
        for kind, item in self._items:
            if kind == "heading":
                level, text = item
                out += ["#" * level + " " + _md(text), ""]
            elif kind == "text":
                for p in item:
                    out += [_md(p), ""]
            elif kind == "figure":
                file, caption, _ = item
                out += [f"![{caption.replace(']', ')')}]({file})", ""]
                if caption:
                    out += [f"*{caption}*", ""]
            elif kind == "table":
                headers, body, caption = item
                if caption:
                    out += [f"**{caption}**", ""]
                width = max([len(headers or [])] + [len(r) for r in body])
                hdr = list(headers or [""] * width) + [""] * (width - len(headers or [""] * width))
                esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
                out.append("| " + " | ".join(esc(h) for h in hdr) + " |")
                out.append("|" + "|".join("---:" if body and i < len(body[0]) and body[0][i][1] else "---"
                                          for i in range(width)) + "|")
                for row in body:
                    cells = [esc(t) for t, _ in row] + [""] * (width - len(row))
                    out.append("| " + " | ".join(cells) + " |")
                out.append("")
            elif kind == "code":
                fence = "````" if "```" in item else "```"
                out += [fence, item, fence, ""]
            elif kind == "cards":
                caption, cards = item
                if caption:
                    out += [_md(caption), ""]
                for title, _, fields in cards:
                    out.append(f"- `{title}`: " + ", ".join(f"{_md(k)} {_md(t)}" for k, (t, _) in fields))
                out.append("")
        return "\n".join(out)

    def write(self, out_dir: Any, *, markdown: bool = False) -> Path:
        """Write ``report.html`` and one PNG per figure into ``out_dir``.

        Parameters
        ----------
        out_dir : str or PathLike
            Folder, created (with parents) if missing.
        markdown : bool, default False
            Also write ``report.md``.

        Returns
        -------
        pathlib.Path
            Path of ``report.html``.

        Notes
        -----
        Each file goes to a temporary file in ``out_dir`` and is renamed into place; the PNGs
        are written before the HTML that refers to them, so a reader never sees a report
        whose images are missing.
        """
        out = Path(out_dir)
        os.makedirs(out, exist_ok=True)
        for kind, item in self._items:
            if kind == "figure":
                file, _, png = item
                _write(out / file, png)
        if markdown:
            _write(out / "report.md", self.to_markdown().encode("utf-8"))
        path = out / "report.html"
        _write(path, self.to_html().encode("utf-8"))
        return path

    def __repr__(self) -> str:
        n_fig = sum(k == "figure" for k, _ in self._items)
        return f"Report({self.title!r}, {len(self._items)} items, {n_fig} figures)"


# ---------------------------------------------------------------------- toolbox sections
# Sections for functional connectivity, lesion studies and connectomes over training: each
# adds a heading, one figure and a table to a Report. Figures come from
# connectome.viz.connectivity (matplotlib is imported only when a section is drawn).


def functional_section(rep: Report, fc: Any, effective: Any = None, coupling: Any = None, *,
                       src_layer: str | None = None, dst_layer: str | None = None, level: int = 2,
                       name: str = "functional") -> None:
    """Functional connectivity next to effective (or structural) connectivity for a layer
    pair, the edge counts per layer, and the structure-function coupling when given.

    Parameters
    ----------
    rep : Report
    fc : FunctionalConnectivity
    effective : Connectome, optional
        An attribution (or weight) graph of the same model, drawn beside.
    coupling : Coupling, optional
        From :func:`connectome.analysis.coupling`; one table row per layer pair.
    src_layer, dst_layer : str, optional
        The pair drawn (default the first tested pair of different layers).
    level : int, default 2
    name : str, default "functional"
        File name of the figure.
    """
    from connectome.viz.connectivity import plot_functional

    rep.add_heading("Functional connectivity", level)
    thr = "every pair" if fc.fdr is None else f"pairs significant at FDR {fc.fdr:g} (Fisher z, Benjamini-Hochberg)"
    rep.add_text(f"Correlation ({fc.method}) of unit activations over {fc.n_images} images; {thr}"
                 + (f", the {fc.top_k} strongest per unit" if fc.top_k else "") + ".")
    rep.add_figure(plot_functional(fc, effective, src_layer, dst_layer),
                   "Which units fire together (left) versus how the flow runs between them (right), over the same "
                   "units of one layer pair.", name)
    g = fc.graph
    rows = [[layer, g.layer(layer).size, int(w["r"].size)] for layer, w in fc.within.items()]
    rep.add_table(rows, headers=["layer", "units", "edges within"],
                  caption=f"{g.num_edges} edges between layers, {fc.n_edges - g.num_edges} within.")
    if coupling is not None:
        rep.add_table([[f"{r.src_layer} -> {r.dst_layer}", r.n_pairs, r.rho, r.p_value]
                       for r in (*coupling.rows, coupling.overall)],
                      headers=["layer pair", "shared pairs", "Spearman rho", "permutation p"],
                      caption=f"Coupling of the two graphs ({coupling.n_permutations} permutations).")


def lesion_section(rep: Report, curves: Any, *, level: int = 2, name: str = "lesion") -> None:
    """The targeted-vs-random attack plot and the areas under the curves.

    Parameters
    ----------
    rep : Report
    curves : mapping of label -> LesionCurve
    level : int, default 2
    name : str, default "lesion"
    """
    from connectome.viz.connectivity import plot_attack

    rep.add_heading("Lesion study: targeted vs random attack", level)
    rep.add_figure(plot_attack(curves), "Accuracy as units are removed cumulatively: hubs first (targeted) or in "
                   "random order (band: min-max over seeds).", name)
    rep.add_table([[k, c.what, c.scope, int(c.n_removed[-1]), c.auc_accuracy, c.auc_prob, len(c.seeds) or 1]
                   for k, c in curves.items()],
                  headers=["order", "removed", "scope", "removed at the end", "accuracy AUC", "probability AUC",
                           "curves"],
                  caption="Areas under the mean curves over the removed fraction, divided by its span.")


def trajectory_section(rep: Report, traj: Any, *, level: int = 2, name: str = "trajectory") -> None:
    """The layer x step heatmap of a connectome over training, and when each circuit formed.

    Parameters
    ----------
    rep : Report
    traj : Trajectory
    level : int, default 2
    name : str, default "trajectory"
    """
    from connectome.viz.connectivity import plot_trajectory

    rep.add_heading("The connectome over training", level)
    rep.add_figure(plot_trajectory(traj), "Top: relative change of the edge weights into each layer between "
                   "consecutive checkpoints. Bottom: stability of the Leiden communities (NMI) and of each "
                   "category's circuit (Jaccard to the final circuit; dotted: 0.5, when it counts as formed).", name)
    rep.add_table([[c, traj.formed[c], float(j[0]), float(j[-2]) if j.size > 1 else float("nan")]
                   for c, j in traj.jaccard.items()],
                  headers=["category", "circuit formed at step", "Jaccard at first step", "Jaccard one step before the end"])
    rep.add_text(f"Persistent hubs (top units by strength at every checkpoint): {', '.join(traj.hubs) or 'none'}.")


# ---------------------------------------------------------------------- faithfulness section
_FAITH_STYLE = {  # baseline -> (colour, line style); the circuit is drawn last, on top
    "random": ("#888888", "-"),
    "activation": ("#1f77b4", "--"),
    "weight": ("#2ca02c", "--"),
    "gradxact": ("#9467bd", "--"),
    "other": ("#ff7f0e", ":"),
}


def plot_faithfulness(result: Any, *, categories: Sequence[str] | None = None, title: str | None = None) -> Any:
    """Necessity and sufficiency curves of each category's circuit against its baselines.

    Parameters
    ----------
    result : FaithfulnessResult
        What :func:`connectome.analysis.faithfulness` returned.
    categories : sequence of str, optional
        Which categories to draw (default: all), one row each.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Per category, two panels over the mass levels: necessity (fraction of the class
        lost when the set is ablated) and sufficiency (fraction kept when only the set is);
        the circuit in black, the random sets' mean with a band of +-1 sd over the seeds,
        and each ranked baseline. The row title carries the verdict.
    """
    from connectome.viz._mpl import pyplot as _plt

    cats = list(result.categories) if categories is None else [str(c) for c in categories]
    missing = [c for c in cats if c not in result.categories]
    if missing:
        raise KeyError(f"no category {missing[0]!r} in the result; it has {list(result.categories)}")
    fig, axs = _plt().subplots(len(cats), 2, figsize=(8.5, 2.1 * len(cats) + 0.6), squeeze=False,
                               layout="constrained", sharex=True)
    for row, c in enumerate(cats):
        r = result.categories[c]
        x = np.asarray(r.levels, dtype=float)
        for col, (curves, rnd, what) in enumerate(((r.necessity, r.random_necessity, "necessity"),
                                                   (r.sufficiency, r.random_sufficiency, "sufficiency"))):
            ax = axs[row, col]
            for name, (colour, ls) in _FAITH_STYLE.items():
                if name in curves:
                    ax.plot(x, curves[name], ls, color=colour, lw=1.2, marker=".", label=name)
            if rnd.size:
                sd = rnd.std(axis=0, ddof=1) if rnd.shape[0] > 1 else np.zeros(x.size)
                ax.fill_between(x, curves["random"] - sd, curves["random"] + sd, color="#888888", alpha=0.2, lw=0)
            ax.plot(x, curves["circuit"], "-", color="black", lw=2, marker="o", ms=3, label="circuit")
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            ax.set_title(f"{c}: {what}" + (f" ({r.verdict})" if col == 0 else ""), fontsize=9)
            if col == 0:
                ax.set_ylabel("fraction of class", fontsize=8)
            if row == len(cats) - 1:
                ax.set_xlabel("circuit flow mass", fontsize=8)
            ax.tick_params(labelsize=7)
    axs[0, 1].legend(fontsize=7, loc="best")
    fig.suptitle(title if title is not None else
                 f"Faithfulness ({result.value} ablation, {result.select} selector)", fontsize=11)
    return fig


def add_faithfulness(rep: Report, results: Any, *, categories: Sequence[str] | None = None, level: int = 2,
                     heading: str = "Faithfulness: necessity and sufficiency against baselines") -> None:
    """Add a faithfulness section to a report: per model, the curves and a verdict table.

    Parameters
    ----------
    rep : Report
    results : FaithfulnessResult or mapping of str -> FaithfulnessResult
        One result, or one per model (by model name).
    categories : sequence of str, optional
        Categories drawn in the figures (the tables list all).
    level : int, default 2
        Heading level of the section.
    heading : str
    """
    from connectome.analysis.faithfulness import ROW_HEADERS

    if hasattr(results, "categories"):
        results = {"": results}
    rep.add_heading(heading, level)
    any_res = next(iter(results.values()))
    rep.add_text(
        f"Necessity: the fraction of the class probability lost when a set of units is ablated (units pass on "
        f"their {any_res.value} value); sufficiency: the fraction kept when only the set is left in the layers it "
        f"touches. Each circuit is compared with sets of the same size per layer: {any_res.n_random} random sets, "
        "the units with the largest activation, weight-flow share or gradient x activation, and the other "
        f"categories' circuits. Verdicts need {any_res.z_min:g} sd above random in necessity (and sufficiency for "
        "'faithful') and, for 'faithful', a necessity area above every baseline (95% bootstrap interval of the "
        "difference over images above 0)."
    )
    for name, res in results.items():
        label = f"{name}: " if name else ""
        rep.add_figure(plot_faithfulness(res, categories=categories,
                                         title=f"{label}faithfulness ({res.value} ablation, {res.select} selector)"),
                       f"{label}necessity and sufficiency over circuit size, circuit (black) vs baselines.",
                       f"faithfulness_{name}" if name else "faithfulness")
        rep.add_table(res.rows(), headers=ROW_HEADERS,
                      caption=f"{label}areas under the curves (mean over the mass levels), z = sd above random.")
