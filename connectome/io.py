"""Files: save/load ``.npz`` (no pickle), GraphML and GEXF for Gephi; the one place to import them from.

The work is done below this facade: :mod:`connectome._files` (atomic writes, file-name
stems), :mod:`connectome.npzformat` (the ``.npz`` writer, header checks and reader),
:mod:`connectome.drawing` (layout, colours, sizes), :mod:`connectome.gephi` (GraphML and
GEXF, written and read) and :mod:`connectome.store` (folders of categories). Every writer
goes to a temporary file beside the target and renames it into place, so a failure never
leaves a half-written file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectome._files import STALE_AFTER_S, atomic_write, file_stem, file_stems, folded_name
from connectome.drawing import layout, node_colors, node_sizes
from connectome.gephi import write_gexf, write_graphml, xml_safe
from connectome.graph import Connectome
from connectome.npzformat import FORMAT, FORMAT_VERSION, check_examples, save, warn_non_finite
from connectome.store import open_folder

__all__ = ["save", "load", "write_graphml", "write_gexf", "layout", "node_colors", "node_sizes", "atomic_write",
           "warn_non_finite", "check_examples", "file_stem", "file_stems", "folded_name", "xml_safe",
           "FORMAT", "FORMAT_VERSION", "STALE_AFTER_S"]


def load(path: Any) -> Connectome:
    """Read a graph written by :meth:`Connectome.save` (no pickle is ever loaded).

    Only the arrays the format defines are read. The header is checked against the
    format's schema first; every array's declared type and shape is checked against the
    header before memory is allocated for it, so a damaged or hostile file costs at most
    what the graph its header describes would (and never more than deflate's 1032:1 of the
    file's size).

    A folder written by ``connectome extract`` opens as a read-only mapping category ->
    Connectome that reads each category when asked (:func:`connectome.store.open_folder`).

    Raises
    ------
    BadFileError
        The file is missing, not an ``.npz``, truncated, damaged, or not a connectome.
    """
    p = Path(path)
    if p.is_dir():
        return open_folder(p)  # type: ignore[return-value]
    return Connectome.from_npz(p, stacklevel=2)
