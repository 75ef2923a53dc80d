"""The ``.npz`` format of one graph: the writer, the header and array checks, and the reader of its parts.

No pickle is ever loaded: only the arrays the format defines are read, each checked against
the header before memory is allocated for it.
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from connectome._files import atomic_write
from connectome.errors import BadFileError
from connectome.example_slots import COLUMN, LISTS
from connectome.layer import Layer

if TYPE_CHECKING:
    from connectome.graph import Connectome

FORMAT = "connectome-npz"
FORMAT_VERSION = 1


def save(g: Connectome, path: Any) -> None:
    """Write ``g`` to one ``.npz`` file, atomically; :func:`load` restores it exactly.

    Parameters
    ----------
    g : Connectome
    path : str or PathLike
        Target file (the name is used as given; ``.npz`` is the convention).

    Raises
    ------
    ExportError
        The folder does not exist.
    """
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layers": [l.to_dict() for l in g.layers],
        "meta": g.meta,
        "node_attrs": sorted(g.node_attrs),
        "edge_attrs": sorted(g.edge_attrs),
    }
    arrays: dict[str, np.ndarray] = {
        "header": np.array(json.dumps(header)),
        "node_units": g.node_units,
        "src": g.src,
        "dst": g.dst,
        "weight": g.weight,
    }
    for k, v in g.node_attrs.items():
        arrays[f"node.{k}"] = v
    for k, v in g.edge_attrs.items():
        arrays[f"edge.{k}"] = v
    with atomic_write(path) as fh:
        np.savez_compressed(fh, **arrays)


# Deflate cannot expand data more than 1032:1 (zlib's "technical details"): a member that
# declares more bytes than that from its compressed size is damaged or hostile.
_MAX_DEFLATE_RATIO = 1032
_MAX_UNITS = 1 << 40  # far beyond any model; keeps every size arithmetic exact
_READ_CHUNK = 1 << 24
_INT = "iu"
_WEIGHT = "iuf"
_ATTR = "biufcUS"  # attribute columns: numbers, bools and plain strings, never objects


def _clip(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def one_line(exc: BaseException, n: int = 200) -> str:
    s = " ".join(str(exc).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _bad_header(p: str, what: str) -> BadFileError:
    return BadFileError(f"{p!r} has a damaged connectome header ({what}); write the graph again with Connectome.save")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_text(s: str) -> bool:
    """Whether ``s`` is Unicode text: no lone surrogate (JSON's ``\\ud800``), which no UTF-8
    file, terminal or font takes (matplotlib raised TypeError drawing such a layer name). Labels
    may hold them (folder names that are not UTF-8); they are shown through ``printable``."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_header(h: Any, p: str) -> list[Layer]:
    """Validate a parsed header against the format's schema and return its layers.

    One pass, linear in the number of layers and labels, before any array is read.
    """
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        found = h.get("format") if isinstance(h, dict) else type(h).__name__
        raise BadFileError(f"{p!r} is not a connectome file (format {_clip(found)}); write graphs with Connectome.save")
    version = h.get("version")
    if not _is_int(version) or version < 1:
        raise _bad_header(p, f"version {_clip(version)} is not a format version")
    if version > FORMAT_VERSION:
        raise BadFileError(f"{p!r} was written by a newer connectome (format v{version}); upgrade torch-connectome")
    layers = h.get("layers")
    if not isinstance(layers, list):
        raise _bad_header(p, f"'layers' is a {type(layers).__name__}, not a list")
    out: list[Layer] = []
    seen: set[str] = set()
    total = 0
    for i, d in enumerate(layers):
        if not isinstance(d, dict):
            raise _bad_header(p, f"layer {i} is a {type(d).__name__}, not an object")
        name, kind, size = d.get("name"), d.get("kind", "other"), d.get("size")
        labels, module = d.get("labels"), d.get("module")
        if not isinstance(name, str) or not name or ":" in name or not _is_text(name):
            raise _bad_header(p, f"layer {i} has the name {_clip(name)}")
        if name in seen:
            raise _bad_header(p, f"layer name {_clip(name)} appears twice")
        seen.add(name)
        if not isinstance(kind, str) or not _is_text(kind):
            raise _bad_header(p, f"layer {_clip(name)} has the kind {_clip(kind)}")
        if not _is_int(size) or not 0 <= size <= _MAX_UNITS:
            raise _bad_header(p, f"layer {_clip(name)} has the size {_clip(size)}")
        total += size
        if labels is not None and (not isinstance(labels, list) or len(labels) != size
                                   or not all(isinstance(s, str) for s in labels)):
            raise _bad_header(p, f"layer {_clip(name)} has labels that are not {size} strings")
        if module is not None and not isinstance(module, str):
            raise _bad_header(p, f"layer {_clip(name)} has the module {_clip(module)}")
        out.append(Layer(name=name, kind=kind, size=size, labels=None if labels is None else tuple(labels),
                         module=module))
    if total > _MAX_UNITS:
        raise _bad_header(p, f"{total} units in all")
    if not isinstance(h.get("meta"), dict):
        raise _bad_header(p, f"'meta' is a {type(h.get('meta')).__name__}, not an object")
    for key in ("node_attrs", "edge_attrs"):
        names = h.get(key)
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names) or len(set(names)) != len(names):
            raise _bad_header(p, f"{key!r} is not a list of distinct names")
    return out


class _Members:
    """The ``.npy`` members of one archive, each checked before memory is allocated for it.

    A member must exist, have an allowed dtype and the shape the header implies, agree with
    the zip directory about its size, and declare no more than deflate can produce from its
    compressed bytes; the compressed bytes of all members read must fit in the file. So
    reading costs at most what the header describes, and never more than the format's
    arrays: other members are never opened.
    """

    def __init__(self, z: zipfile.ZipFile, p: str, file_bytes: int):
        self.z, self.p, self.left = z, p, file_bytes

    def _info(self, name: str) -> zipfile.ZipInfo:
        try:
            return self.z.getinfo(f"{name}.npy")
        except KeyError:
            raise BadFileError(f"{self.p!r} is missing the array {name!r}; the file is damaged") from None

    def _bad(self, name: str, what: str) -> BadFileError:
        return BadFileError(f"{self.p!r} is not a readable connectome file: its array {name!r} {what}; "
                            "it is damaged or another kind of file - write it again with Connectome.save")

    def _open_npy(self, name: str, fh: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(fh)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise self._bad(name, f"has .npy version {version}")
        shape, _, dtype = read(fh)
        return tuple(shape), dtype

    def length(self, name: str) -> int:
        """The declared length of a 1-D member (without reading its data)."""
        with self.z.open(self._info(name)) as fh:
            shape, _ = self._open_npy(name, fh)
        if len(shape) != 1:
            raise self._bad(name, f"has the shape {_clip(shape)}, not one dimension")
        return int(shape[0])

    def read(self, name: str, length: int | None, kinds: str) -> np.ndarray:
        """Member ``name``: 1-D of ``length`` (None: a 0-d value) with a dtype of ``kinds``."""
        info = self._info(name)
        self.left -= info.compress_size
        if self.left < 0:
            raise self._bad(name, "claims more compressed bytes than the file holds")
        with self.z.open(info) as fh:
            shape, dtype = self._open_npy(name, fh)
            start = fh.tell()
            if dtype.hasobject or dtype.kind not in kinds:
                raise self._bad(name, f"has the type {dtype}")
            want = () if length is None else (length,)
            if shape != want:
                raise self._bad(name, f"has the shape {_clip(shape)} where the header implies {want}")
            nbytes = math.prod(shape) * dtype.itemsize
            if info.file_size != start + nbytes:
                raise self._bad(name, f"declares {nbytes} bytes of data where the archive holds {info.file_size - start}")
            if nbytes > _MAX_DEFLATE_RATIO * max(info.compress_size, 1) + 4096:
                raise self._bad(name, f"declares {nbytes} bytes from {info.compress_size} compressed bytes")
            buf = np.empty(nbytes, dtype=np.uint8)
            view, pos = memoryview(buf), 0
            while pos < nbytes:
                got = fh.readinto(view[pos : pos + _READ_CHUNK])
                if not got:
                    raise self._bad(name, "is truncated")
                pos += got
            if fh.read(1):  # reading to the end also makes zipfile check the member's CRC
                raise self._bad(name, "is longer than it declares")
        out = buf.view(dtype).reshape(want)
        out.setflags(write=False)  # nothing else holds it: the Connectome may keep it without a copy
        return out


#: The largest model input side ``meta["examples"]["input_size"]`` may state. Classifiers are
#: traced at 224 to 1,024 pixels; ``view``, ``report`` and ``export`` allocate images of this
#: size (and a zoo data set of them), so a crafted size of 10^6 would ask for terabytes.
MAX_EXAMPLE_IMAGE_SIDE = 4096
_MAX_FIELD = 1 << 24  # any field value; keeps height x width within int64
_FIELD = ("jump_y", "start_y", "size_y", "jump_x", "start_x", "size_x", "height", "width")


def check_examples(ex: Any, layers: Sequence[Layer], node_attrs: dict[str, np.ndarray], p: str) -> None:
    """Validate ``meta["examples"]`` (``ex``) of a graph read from file ``p`` against what the
    extractors write and the patch code reads; raise a BadFileError naming ``p`` and the field.

    The schema, from ``ExampleTracker.meta`` and ``ImageOrder.describe``
    (:mod:`connectome.extract.dataset_examples`) and the CLI's ``data``: ``k`` a positive int;
    ``input_size`` ``[height, width]`` in 1..:data:`MAX_EXAMPLE_IMAGE_SIDE` or null; ``fields``
    layer name -> null or the 8 ints of :func:`connectome.extract.receptive.receptive_fields`
    (jumps, sizes and the map's height and width >= 1); ``lists`` names of
    :data:`connectome.example_slots.LISTS`; ``index``, ``dataset`` and ``data`` strings;
    ``paths`` image index -> path; ``stamps`` an object (image index -> ``[size, mtime_ns]``).
    Other keys are kept unread. Each example slot has all three columns
    (``example_index_j``, ``example_value_j``, ``example_pos_j``). Every stored position
    (``example_pos_j``) of a layer with a field must lie on its ``height x width`` map and
    its receptive field must overlap the image, so no crop that
    :func:`connectome.patches.crop_box` cuts is empty (a layer that pads by more than its
    kernel reaches would have positions that see only padding; no classifier does).
    """
    def bad(field: str, what: str) -> BadFileError:
        return BadFileError(f"{p!r} has damaged example metadata: meta['examples'][{field!r}] {what}; "
                            "extract the graph again with --examples")

    if ex is None:
        return
    if not isinstance(ex, dict):
        raise BadFileError(f"{p!r} has damaged example metadata: meta['examples'] is a {type(ex).__name__}, "
                           "not an object; extract the graph again with --examples")
    k = ex.get("k")
    if k is not None and (not _is_int(k) or k < 1):
        raise bad("k", f"is {_clip(k)}, not a positive number of examples per unit")
    size = ex.get("input_size")
    if size is not None and (not isinstance(size, list) or len(size) != 2
                             or not all(_is_int(v) and 1 <= v <= MAX_EXAMPLE_IMAGE_SIDE for v in size)):
        raise bad("input_size", f"is {_clip(size)}, not [height, width] in 1..{MAX_EXAMPLE_IMAGE_SIDE} pixels")
    fields = ex.get("fields", {})
    if not isinstance(fields, dict):
        raise bad("fields", f"is a {type(fields).__name__}, not an object")
    for name, f in fields.items():
        if f is None:
            continue
        if not isinstance(f, list) or len(f) != len(_FIELD) or not all(_is_int(v) and abs(v) <= _MAX_FIELD for v in f):
            raise bad("fields", f"of layer {_clip(name)} is {_clip(f)}, not 8 integers {list(_FIELD)}")
        low = [n for n, v in zip(_FIELD, f) if not n.startswith("start") and v < 1]
        if low:
            raise bad("fields", f"of layer {_clip(name)} has {low[0]} {f[_FIELD.index(low[0])]}, not >= 1")
    lists = ex.get("lists", [])
    if not isinstance(lists, list) or not all(isinstance(v, str) and v in LISTS for v in lists):
        raise bad("lists", f"is {_clip(lists)}, not a list of {sorted(LISTS)}")
    for key in ("index", "dataset", "data"):
        if ex.get(key) is not None and not isinstance(ex[key], str):
            raise bad(key, f"is a {type(ex[key]).__name__}, not a string")
    paths = ex.get("paths", {})
    if not isinstance(paths, dict) or not all(isinstance(v, str) for v in paths.values()):
        raise bad("paths", "is not an object of image index -> file path")
    stamps = ex.get("stamps")
    if stamps is not None and not isinstance(stamps, dict):
        raise bad("stamps", f"is a {type(stamps).__name__}, not an object of image index -> [size, mtime_ns]")
    # every stored position lies on its layer's map and its crop on the image: a crop outside
    # it is empty, and the patch code divides by its size
    maps = [fields.get(l.name) for l in layers]
    sizes = [l.size for l in layers]
    f = np.repeat(np.array([[0] * 8 if m is None else m for m in maps], dtype=np.int64).reshape(-1, 8), sizes, axis=0)
    has = np.repeat(np.array([m is not None for m in maps], dtype=bool), sizes)
    # the patch code reads the index, value and pos columns of a slot together (a Gephi user
    # may delete one, or retype it as text, which the reader drops)
    for c in node_attrs:
        if m := COLUMN.match(c):
            lacking = [f"{m.group(1)}_{part}_{m.group(3)}" for part in ("index", "value", "pos")
                       if f"{m.group(1)}_{part}_{m.group(3)}" not in node_attrs]
            if lacking:
                raise BadFileError(f"{p!r} has the example column {c!r} without {lacking[0]!r}; "
                                   "extract the graph again with --examples")
    for prefix in LISTS.values():
        j = 0
        while f"{prefix}_pos_{j}" in node_attrs:
            col = f"{prefix}_pos_{j}"
            pos = node_attrs[col]
            if pos.dtype.kind not in _INT:
                raise bad("fields", f"cannot place column {col!r} of type {pos.dtype}")
            stored = has & (pos >= 0)
            off = stored & (pos >= f[:, 6] * f[:, 7])
            if size is not None:
                r, c = np.divmod(np.where(off | ~stored, 0, pos), np.maximum(f[:, 7], 1))
                y0, x0 = f[:, 1] + r * f[:, 0], f[:, 4] + c * f[:, 3]
                off |= stored & ((y0 >= size[0]) | (y0 + f[:, 2] <= 0) | (x0 >= size[1]) | (x0 + f[:, 5] <= 0))
            if off.any():
                i = int(np.flatnonzero(off)[0])
                layer = layers[int(np.searchsorted(np.cumsum(sizes), i, side="right"))].name
                raise bad("fields", f"of layer {_clip(layer)} puts position {int(pos[i])} (column {col!r}) off its "
                                    f"{int(f[i, 6])}x{int(f[i, 7])} map or the {_clip(size)} image")
            j += 1


def _non_finite(g: Connectome) -> list[str]:
    """Where ``g`` holds values that cannot be right: NaN or infinite edge weights per layer
    pair, infinite node attributes per layer.

    NaN in a node attribute is this package's "no value" (no example in that slot, a statistic
    not measured on the input layer, a unit a Gephi column does not cover) and is not counted.
    """
    names = [l.name for l in g.layers]
    nl = g.node_layer

    def per(keys: np.ndarray, name: Callable[[int], str]) -> str:
        vals, counts = np.unique(keys, return_counts=True)
        items = [f"{name(v)}: {c}" for v, c in zip(vals.tolist(), counts.tolist())]
        return ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")

    out: list[str] = []
    if g.weight.dtype.kind == "f":
        bad = ~np.isfinite(g.weight)
        if bad.any():
            pairs = nl[g.src[bad]] * len(names) + nl[g.dst[bad]]
            out.append(f"{int(bad.sum())} edge weights ("
                       + per(pairs, lambda v: f"{names[v // len(names)]}->{names[v % len(names)]}") + ")")
    for k, v in g.node_attrs.items():
        if v.dtype.kind == "f" and (bad := np.isinf(v)).any():
            out.append(f"{int(bad.sum())} infinite values of node attribute {k!r} ("
                       + per(nl[bad], lambda i: names[i]) + ")")
    return out


def warn_non_finite(g: Connectome, source: str, stacklevel: int = 3) -> None:
    """Warn, naming ``source``, when ``g`` has NaN or infinite edge weights or infinite node attributes.

    Warned, not refused: every format this package writes keeps them exactly (``.npz`` stores
    the doubles, GraphML and GEXF write ``NaN``/``INF``/``-INF`` and read them back), so saving
    is never silently wrong; the harm is downstream (drawings size them as 0, sums turn NaN),
    and refusing would lock the user out of the very file they need to open to find the cause.

    Parameters
    ----------
    g : Connectome
    source : str
        The file ``g`` was read from, named in the message.
    stacklevel : int, default 3
        Passed to :func:`warnings.warn` (3: the caller of the function that calls this one).
    """
    found = _non_finite(g)
    if found:
        warnings.warn(f"{source!r} holds non-finite values: {'; '.join(found)}; they are kept, but drawings treat "
                      "them as 0 and sums over them are NaN - check the model and data it came from",
                      stacklevel=stacklevel)


def read_parts(path: Any) -> dict[str, Any]:
    """The checked arrays and header of a ``.npz`` written by :func:`save`, as keyword arguments of ``Connectome``.

    Raises
    ------
    BadFileError
        The file is missing, not an ``.npz``, truncated, damaged, or not a connectome.
    """
    p = Path(path)
    ps = str(p)
    if not p.is_file():
        raise BadFileError(f"no such file: {ps!r}; pass the path of a .npz written by Connectome.save")
    try:
        with zipfile.ZipFile(p) as z:
            if "header.npy" not in set(z.namelist()):
                raise BadFileError(f"{ps!r} is an .npz but not a connectome (no header); write graphs with Connectome.save")
            m = _Members(z, ps, p.stat().st_size)
            try:
                header = json.loads(str(m.read("header", None, "U")[()]))
            except RecursionError:
                raise _bad_header(ps, "nested too deeply") from None
            layers = _check_header(header, ps)
            n = sum(l.size for l in layers)
            units = m.read("node_units", n, _INT)
            node_attrs = {k: m.read(f"node.{k}", n, _ATTR) for k in header["node_attrs"]}
            check_examples(header["meta"].get("examples"), layers, node_attrs, ps)
            n_edges = m.length("src")
            if n_edges > n * (n - 1) // 2:
                raise BadFileError(f"{ps!r} declares {n_edges} edges among {n} units, more than one per pair; "
                                   "the file is damaged")
            src = m.read("src", n_edges, _INT)
            dst = m.read("dst", n_edges, _INT)
            weight = m.read("weight", n_edges, _WEIGHT)
            edge_attrs = {k: m.read(f"edge.{k}", n_edges, _ATTR) for k in header["edge_attrs"]}
    except BadFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError, UnicodeDecodeError,
            NotImplementedError, SyntaxError, OverflowError) as exc:
        raise BadFileError(
            f"{ps!r} is not a readable connectome file ({type(exc).__name__}: {one_line(exc)}); it may be truncated "
            "or another kind of file - write it again with Connectome.save"
        ) from None
    return dict(layers=tuple(layers), node_units=units, src=src, dst=dst, weight=weight,
                node_attrs=node_attrs, edge_attrs=edge_attrs, meta=header["meta"])
