"""Files: save/load ``.npz`` (no pickle), GraphML and GEXF for Gephi.

Every writer goes to a temporary file beside the target and renames it into place, so a
failure never leaves a half-written file. GraphML and GEXF are streamed in blocks of edges
formatted from the arrays: neither the document nor a Python list of a whole column ever
exists in memory. :func:`load` reads only the arrays the format defines and checks every
declared shape and type against the header before it allocates anything.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import json
import math
import os
import re
import socket
import stat
import tempfile
import time
import unicodedata
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence
from xml.sax.saxutils import escape, quoteattr

import numpy as np


from connectome.errors import BadFileError, ConnectomeError, ExportError
from connectome.graph import Connectome, Layer
from connectome.kinds import KINDS

__all__ = ["save", "load", "write_graphml", "write_gexf", "layout", "node_colors", "atomic_write",
           "warn_non_finite", "check_examples"]

FORMAT = "connectome-npz"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- atomic writes
_TMP_MARK = "cntmp"
# .<name, at most 80 bytes>.cntmp-<host hash>-<pid>.<mkstemp's 8 random chars>.tmp
_TMP_RE = re.compile(r"\..*\.cntmp-([0-9a-f]{8})-([0-9]+)\.[a-z0-9_]+\.tmp", re.S)
_TMP_NAME_BYTES = 80
STALE_AFTER_S = 60.0  # a temp file untouched this long, whose writer has died, is garbage
_LAST_SCAN: dict[str, float] = {}  # folder -> when this process last looked for stale temp files
STALE_OTHER_HOST_S = 86400.0  # on a shared folder another host's writer cannot be asked: wait a day


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, and belongs to someone else
        return True
    return True


def _remove_stale_temps(folder: Path) -> None:
    """Delete temporary files of our own naming whose writer was killed (``kill -9``, power loss).

    A file is stale when its writer ran on this host and no longer exists, or it was written
    on another host and has not changed for a day; and in both cases it has not changed for
    :data:`STALE_AFTER_S` seconds. Files of live writers (other processes saving into the same
    folder, such as the ranks of a distributed run) are never touched.
    """
    if os.name != "posix":  # os.kill(pid, 0) is not a probe elsewhere
        return
    host, me, now = _host_tag(), os.getpid(), time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = _TMP_RE.fullmatch(entry.name)
        if m is None or (m.group(1) == host and int(m.group(2)) == me):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if not entry.is_file(follow_symlinks=False) or age < STALE_AFTER_S:
                continue
            if (m.group(1) == host and not _pid_alive(int(m.group(2)))) or age > STALE_OTHER_HOST_S:
                os.unlink(entry.path)
        except OSError:  # another process removed it first, or we may not: leave it
            continue


def _short_name(name: str, limit: int = _TMP_NAME_BYTES) -> str:
    """``name`` cut to at most ``limit`` bytes in the file system's encoding."""
    return os.fsdecode(os.fsencode(name)[:limit])


STEM_BYTES = 100  # file-name stems from user text: room for a hash, a suffix and a temp prefix in 255


def file_stem(name: str, max_bytes: int = STEM_BYTES, hashed: bool = False) -> str:
    """A file name stem for ``name``: the name itself when it is a safe, short file name,
    else its safe characters (cut to ``max_bytes``) and a hash of the whole name.

    Safe characters are letters, digits, ``-``, ``_`` and ``.`` (not leading). Distinct names
    give distinct stems (the hash), and a name always gives the same stem. ``hashed`` adds
    the hash to safe names too (to tell apart names a case-insensitive file system merges).

    Examples
    --------
    >>> file_stem("circle")
    'circle'
    >>> file_stem("a b") == file_stem("a?b")
    False
    """
    safe = "".join(ch if (ch.isalnum() or ch in "-_.") and ch.isprintable() else "_" for ch in name)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    raw = name.encode("utf-8", "surrogatepass")
    if safe == name and 0 < len(raw) <= max_bytes and not hashed:
        return name
    cut = safe.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore") or "_"
    return f"{cut}-{hashlib.sha256(raw).hexdigest()[:10]}"


def folded_name(name: str) -> str:
    """``name`` as case-insensitive file systems compare it: Unicode NFC, then case-folded.

    macOS and Windows file systems treat ``Conv_0.png`` and ``conv_0.png`` as one file, and
    macOS treats the NFC and NFD spellings of ``é`` as one name too. Case folding can leave a
    name out of NFC (the Angstrom sign folds to a decomposed form), so it is normalised again.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def file_stems(names: Iterable[str], max_bytes: int = STEM_BYTES) -> dict[str, str]:
    """One file name stem per distinct name (see :func:`file_stem`), distinct on every file system.

    Names whose stems only a case- or normalisation-insensitive file system would merge
    (``Conv``, ``conv``; the NFC and NFD spellings of one word) all get their hash, so no
    file of one is written over a file of another, and a name keeps its stem from run to run
    whatever the other names are, except for the hash it gets beside such a twin.

    Raises
    ------
    ConnectomeError
        Two names still map to one stem (a hash collision in 40 bits): rename one.

    Examples
    --------
    >>> s = file_stems(["circle", "Conv", "conv"])
    >>> s["circle"], s["Conv"] != s["conv"], s["Conv"].startswith("Conv-")
    ('circle', True, True)
    """
    stems = {n: file_stem(n, max_bytes) for n in dict.fromkeys(names)}
    by_folded: dict[str, list[str]] = {}
    for n, stem in stems.items():
        by_folded.setdefault(folded_name(stem), []).append(n)
    for group in by_folded.values():
        if len(group) > 1:
            for n in group:
                stems[n] = file_stem(n, max_bytes, hashed=True)
    seen: dict[str, str] = {}
    for n, stem in stems.items():
        other = seen.setdefault(folded_name(stem), n)
        if other != n:
            raise ConnectomeError(f"names {other!r} and {n!r} map to one file name even with their hashes; rename one")
    return stems


@contextlib.contextmanager
def atomic_write(path: Any, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only if the block succeeds.

    The result is the old file or the new one, never a mix, whenever the process stops.
    Overwriting keeps the existing file's permission bits; a new file gets those a plain
    ``open()`` would give it. When ``path`` is a symbolic link the link's target is written,
    as ``open()`` would, and the link stays. Temporary files left behind by a killed writer
    in the folder are removed (see :func:`_remove_stale_temps`; a folder is looked at once per
    :data:`STALE_AFTER_S` seconds, the age a temp file needs to be stale).

    Raises
    ------
    ExportError
        ``path`` is a folder, or its folder does not exist.
    """
    given = Path(path)
    if given.is_dir():
        raise ExportError(f"cannot write {str(given)!r}: it is a folder; give a file name")
    # Through a symlink: replace the file it points to (renaming onto the link would replace the link).
    target = Path(os.path.realpath(given))
    folder = target.parent
    if not folder.is_dir():
        where = folder if given.is_symlink() else (given.parent if str(given.parent) else Path("."))
        raise ExportError(f"cannot write {str(given)!r}: folder {str(where)!r} does not exist; create it first")
    _scan_now = time.monotonic()
    if _scan_now - _LAST_SCAN.get(str(folder), -math.inf) >= STALE_AFTER_S:
        # once per folder and STALE_AFTER_S: a file has to be that old to be stale anyway, and a
        # scan per write made writing a folder of n files (export --examples) quadratic
        _LAST_SCAN[str(folder)] = _scan_now
        _remove_stale_temps(folder)
    try:
        mode_bits = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode_bits = 0o666 & ~umask
    prefix = f".{_short_name(target.name)}.{_TMP_MARK}-{_host_tag()}-{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            os.chmod(tmp, mode_bits)  # mkstemp makes the file 0600
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); best effort where folders cannot be opened."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- npz
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


def _one_line(exc: BaseException, n: int = 200) -> str:
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
    :data:`connectome.patches.LISTS`; ``index``, ``dataset`` and ``data`` strings;
    ``paths`` image index -> path; ``stamps`` an object (image index -> ``[size, mtime_ns]``).
    Other keys are kept unread. Each example slot has all three columns
    (``example_index_j``, ``example_value_j``, ``example_pos_j``). Every stored position
    (``example_pos_j``) of a layer with a field must lie on its ``height x width`` map and
    its receptive field must overlap the image, so no crop that
    :func:`connectome.patches.crop_box` cuts is empty (a layer that pads by more than its
    kernel reaches would have positions that see only padding; no classifier does).
    """
    from connectome.patches import _COLUMN, LISTS

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
        if m := _COLUMN.match(c):
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
        from connectome.store import open_folder

        return open_folder(p)  # type: ignore[return-value]
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
            f"{ps!r} is not a readable connectome file ({type(exc).__name__}: {_one_line(exc)}); it may be truncated "
            "or another kind of file - write it again with Connectome.save"
        ) from None
    try:
        g = Connectome(layers=tuple(layers), node_units=units, src=src, dst=dst, weight=weight,
                       node_attrs=node_attrs, edge_attrs=edge_attrs, meta=header["meta"])
    except (ConnectomeError, TypeError, ValueError) as exc:
        raise BadFileError(f"{ps!r} holds inconsistent arrays ({_one_line(exc)}); the file is damaged") from None
    warn_non_finite(g, ps)
    return g


# ---------------------------------------------------------------------------- layout and colour
def layout(g: Connectome, x_spacing: float = 200.0, y_spacing: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Positions that draw the graph as a layered diagram: x by layer order, y spread within a layer.

    Returns
    -------
    x, y : ndarray, shape (n_nodes,)
    """
    x = g.node_layer.astype(np.float64) * x_spacing
    y = np.zeros(g.num_nodes)
    for l in g.layers:
        sl = g.layer_slice(l.name)
        y[sl] = (np.arange(l.size) - (l.size - 1) / 2.0) * y_spacing
    return x, y


_KIND_HUE = {k: v.hue for k, v in KINDS.items()}  # one table of kinds: connectome/kinds.py


def node_colors(g: Connectome) -> np.ndarray:
    """RGB colours (0-255), shape (n_nodes, 3): by community if present, else by layer kind."""
    if "community" in g.node_attrs:
        # the palette of every figure, so that a community has one colour in Gephi and in the report
        from connectome.viz.palette import community_rgb

        rgb = np.asarray(community_rgb(g.node_attrs["community"]), dtype=np.float64).reshape(-1, 3)
    else:
        kinds = [g.layers[i].kind for i in g.node_layer]
        rgb = np.array([colorsys.hsv_to_rgb(_KIND_HUE.get(k, 0.0), 0.55 if k != "input" else 0.0, 0.85) for k in kinds])
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.int64).reshape(-1, 3)


def node_sizes(g: Connectome, lo: float = 4.0, hi: float = 30.0) -> np.ndarray:
    """Node sizes for drawing: by |attribution| if present, else by total |edge weight|."""
    if "attribution" in g.node_attrs:
        v = np.abs(np.asarray(g.node_attrs["attribution"], dtype=np.float64))
    else:
        a = np.abs(g.weight.astype(np.float64))
        v = np.bincount(g.src, weights=a, minlength=g.num_nodes) + np.bincount(g.dst, weights=a, minlength=g.num_nodes)
    v = np.where(np.isfinite(v), v, 0.0)
    top = v.max() if v.size else 0.0
    return lo + (hi - lo) * (np.sqrt(v / top) if top > 0 else np.zeros_like(v))


# ---------------------------------------------------------------------------- XML text
# XML 1.0 cannot carry these characters, not even as character references: the C0 controls
# other than tab, LF and CR; lone surrogates (Python's stand-ins for file-name bytes that are
# not UTF-8); U+FFFE and U+FFFF. Writers put U+FFFD (the replacement character) in their place.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(s: str) -> str:
    """``s`` with each character that XML 1.0 forbids replaced by U+FFFD."""
    return _XML_ILLEGAL.sub("\ufffd", s)


def _text(v: Any) -> str:
    """Element content; a CR as a reference, since parsers turn a literal one into LF."""
    return escape(xml_safe(str(v)), {"\r": "&#13;"})


def _attr(v: Any) -> str:
    """A quoted attribute value (``quoteattr`` writes tab, LF and CR as references)."""
    return quoteattr(xml_safe(str(v)))


def _fmt(v: Any) -> str:
    """A number as XML text (the spellings Gephi and networkx read for non-finite values)."""
    if isinstance(v, (float, np.floating)):
        return repr(float(v)) if np.isfinite(v) else ("NaN" if np.isnan(v) else ("INF" if v > 0 else "-INF"))
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    return str(v)


_BOOL_TEXT = np.array(["false", "true"], dtype=object)
_NUMERIC = "biuf"


def _number_texts(a: np.ndarray) -> list[str]:
    """Text of each value of a numeric array, formatted in C in one call per block.

    Floats take 17 significant digits, which read back as exactly the same double; that is
    half the time of the shortest representation (``repr``).
    """
    if a.dtype.kind == "b":
        return _BOOL_TEXT[a.astype(np.intp)].tolist()
    if a.dtype.kind in "iu":
        return (("%d\n" * a.size) % tuple(a.tolist())).split("\n")[:-1]
    f = a.astype(np.float64, copy=False)
    out = (("%.17g\n" * f.size) % tuple(f.tolist())).split("\n")[:-1]
    bad = ~np.isfinite(f)
    if bad.any():
        for i in np.flatnonzero(bad).tolist():
            out[i] = _fmt(f[i])
    return out


def _xml_type(arr: np.ndarray) -> str:
    kind = arr.dtype.kind
    if kind == "b":
        return "boolean"
    if kind in "iu":
        return "long"
    if kind == "f":
        return "double"
    return "string"


class _Column:
    """One attribute column of the export: how to spell a block of it, and its XML type."""

    def __init__(self, values: np.ndarray, in_attribute: bool):
        self.values = values
        self.type = _xml_type(values)
        self.numeric = values.dtype.kind in _NUMERIC
        quote = _attr if in_attribute else _text
        self._quote = quote
        # numbers need no escaping; in an attribute they still need their quotes
        self.slot = '"%s"' if (self.numeric and in_attribute) else "%s"

    def texts(self, start: int, stop: int) -> list[str]:
        block = self.values[start:stop]
        if self.numeric:
            return _number_texts(block)
        return [self._quote(v) for v in block.tolist()]


def _rows(fh: IO[str], n: int, row: str, cols: list[Callable[[int, int], list[str]]], block: int = 8192) -> None:
    """Write ``n`` rows: ``row`` is a template with one ``%s`` per entry of ``cols``, each a
    function giving the texts of rows ``start..stop``. A block of rows is one ``"".join`` of
    the template's constant pieces interleaved with the columns: the per-row work stays in C."""
    pieces: list[str | Callable[[int, int], list[str]]] = []
    consts = row.split("%s")
    if len(consts) != len(cols) + 1:
        raise ValueError(f"row template has {len(consts) - 1} slots for {len(cols)} columns")
    for j, const in enumerate(consts):
        if const:
            pieces.append(const)
        if j < len(cols):
            pieces.append(cols[j])
    width = len(pieces)
    for start in range(0, n, block):
        stop = min(start + block, n)
        k = stop - start
        parts: list[str] = [""] * (k * width)
        for j, piece in enumerate(pieces):
            parts[j::width] = [piece] * k if isinstance(piece, str) else piece(start, stop)
        fh.write("".join(parts))


def _distinct(names: list[str], what: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        safe = xml_safe(name)
        if safe in seen and seen[safe] != name:
            raise ExportError(
                f"{what} {seen[safe]!r} and {name!r} differ only in characters XML 1.0 cannot carry; rename one"
            )
        seen[safe] = name


def _export_columns(g: Connectome, in_attribute: bool) -> tuple[dict[str, _Column], dict[str, _Column]]:
    """Node columns (Gephi's keys first, then every node attribute) and further edge columns."""
    if not isinstance(g, Connectome):
        raise ExportError(f"expected a Connectome, got {type(g).__name__}")
    _distinct([l.name for l in g.layers], "layers")
    _distinct(list(g.node_attrs), "node attributes")
    _distinct(list(g.edge_attrs), "edge attributes")
    x, y = layout(g)
    rgb = node_colors(g)
    sizes = np.array([l.size for l in g.layers], dtype=np.int64)  # int also when there are no layers
    node_cols: dict[str, np.ndarray] = {
        "label": g.node_labels,
        "layer": np.repeat(np.array([l.name for l in g.layers], dtype=object), sizes),
        "kind": np.repeat(np.array([l.kind for l in g.layers], dtype=object), sizes),
        "index": g.node_units,
        "x": x,
        "y": y,
        "size": node_sizes(g),
        "r": rgb[:, 0],
        "g": rgb[:, 1],
        "b": rgb[:, 2],
    }
    for k, v in g.node_attrs.items():
        if k in node_cols:
            raise ExportError(f"node attribute {k!r} collides with a Gephi key; rename it with with_node_attrs")
        node_cols[k] = v
    if "example_index_0" in g.node_attrs and (g.meta.get("examples") or {}).get("paths") \
            and "example_path" not in node_cols:  # each unit's top image, for a Gephi user to open
        from connectome.patches import top_example

        node_cols["example_path"] = np.asarray(top_example(g)[1], dtype=object)
    for k in g.edge_attrs:
        if k in ("weight", "signed_weight"):
            raise ExportError(f"edge attribute {k!r} collides with a reserved key")
    return ({k: _Column(v, in_attribute) for k, v in node_cols.items()},
            {k: _Column(v, in_attribute) for k, v in g.edge_attrs.items()})


class _Weights:
    """``|w|`` and ``w`` of a block of edges from one formatting pass: ``w`` is a sign and ``|w|``."""

    _SIGN = np.array(["", "-"], dtype=object)

    def __init__(self, g: Connectome):
        self.w = g.weight
        self._cache: tuple[int, list[str], list[str]] | None = None

    def _block(self, start: int, stop: int) -> tuple[list[str], list[str]]:
        if self._cache is None or self._cache[0] != start:
            w = self.w[start:stop].astype(np.float64)
            neg = np.signbit(w) & ~np.isnan(w)
            self._cache = (start, _number_texts(np.abs(w)), self._SIGN[neg.astype(np.intp)].tolist())
        return self._cache[1], self._cache[2]

    def magnitude(self, start: int, stop: int) -> list[str]:
        return self._block(start, stop)[0]

    def sign(self, start: int, stop: int) -> list[str]:
        return self._block(start, stop)[1]


def _ids(g: Connectome) -> np.ndarray:
    """Each node id as a quoted attribute value, ready to be picked by edge endpoints."""
    return np.array([_attr(i) for i in g.node_ids.tolist()], dtype=object)


def write_graphml(g: Connectome, path: Any) -> None:
    """Write GraphML that Gephi opens as a layered diagram.

    Node keys ``label, x, y, size, r, g, b`` are read by Gephi as label, position, size and
    colour; ``layer``, ``kind``, ``index`` and every node attribute travel too. Edge ``weight``
    is ``|w|`` (Gephi wants positive weights); the signed value is ``signed_weight``.

    The file is always well-formed XML 1.0: characters XML cannot carry (C0 controls other
    than tab, LF and CR, lone surrogates, U+FFFE, U+FFFF) are written as U+FFFD, and CR is
    written as a character reference so that it survives reading. Floats are written with
    17 significant digits and read back exactly.

    Parameters
    ----------
    g : Connectome
    path : str or PathLike

    Raises
    ------
    ExportError
        The folder does not exist, an attribute name collides with a Gephi key, or two layer
        or attribute names differ only in characters XML cannot carry.
    """
    node_cols, edge_cols = _export_columns(g, in_attribute=False)
    ids = _ids(g)
    weights = _Weights(g)
    src, dst = g.src, g.dst
    with atomic_write(path, "w") as fh:
        fh.write('<?xml version="1.0" encoding="UTF-8"?>\n')
        fh.write(
            '<graphml xmlns="http://graphml.graphdrawing.org/xmlns" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="http://graphml.graphdrawing.org/xmlns '
            'http://graphml.graphdrawing.org/xmlns/1.0/graphml.xsd">\n'
        )
        for i, (k, c) in enumerate(node_cols.items()):
            fh.write(f'  <key id="n{i}" for="node" attr.name={_attr(k)} attr.type="{c.type}"/>\n')
        fh.write('  <key id="e0" for="edge" attr.name="weight" attr.type="double"/>\n')
        fh.write('  <key id="e1" for="edge" attr.name="signed_weight" attr.type="double"/>\n')
        for i, (k, c) in enumerate(edge_cols.items(), start=2):
            fh.write(f'  <key id="e{i}" for="edge" attr.name={_attr(k)} attr.type="{c.type}"/>\n')
        fh.write('  <key id="g0" for="graph" attr.name="meta" attr.type="string"/>\n')
        fh.write('  <graph id="G" edgedefault="directed">\n')
        fh.write(f'    <data key="g0">{_text(json.dumps(g.meta))}</data>\n')
        row = "    <node id=%s>" + "".join(f'<data key="n{i}">%s</data>' for i in range(len(node_cols))) + "</node>\n"
        _rows(fh, g.num_nodes, row, [lambda a, b: ids[a:b].tolist()] + [c.texts for c in node_cols.values()])
        row = ('    <edge source=%s target=%s><data key="e0">%s</data><data key="e1">%s%s</data>'
               + "".join(f'<data key="e{i}">%s</data>' for i in range(2, 2 + len(edge_cols))) + "</edge>\n")
        _rows(fh, g.num_edges, row, [lambda a, b: ids[src[a:b]].tolist(), lambda a, b: ids[dst[a:b]].tolist(),
                                     weights.magnitude, weights.sign, weights.magnitude]
              + [c.texts for c in edge_cols.values()])
        fh.write("  </graph>\n</graphml>\n")


def write_gexf(g: Connectome, path: Any) -> None:
    """Write GEXF 1.2 with ``viz:position``, ``viz:color`` and ``viz:size`` for Gephi.

    Carries the same attributes as :func:`write_graphml`; edge ``weight`` is ``|w|`` and the
    signed value is the ``signed_weight`` attribute. Text is made XML-safe as there.
    """
    node_cols, edge_cols = _export_columns(g, in_attribute=True)
    viz = ("label", "x", "y", "size", "r", "g", "b")
    n_attrs = {k: c for k, c in node_cols.items() if k not in viz}
    ids = _ids(g)
    weights = _Weights(g)
    src, dst = g.src, g.dst
    with atomic_write(path, "w") as fh:
        fh.write('<?xml version="1.0" encoding="UTF-8"?>\n')
        fh.write(
            '<gexf xmlns="http://www.gexf.net/1.2draft" xmlns:viz="http://www.gexf.net/1.2draft/viz" '
            'version="1.2">\n'
        )
        fh.write(f"  <meta><description>{_text(json.dumps(g.meta))}</description></meta>\n")
        fh.write('  <graph defaultedgetype="directed" mode="static">\n')
        fh.write('    <attributes class="node" mode="static">\n')
        for i, (k, c) in enumerate(n_attrs.items()):
            fh.write(f'      <attribute id="{i}" title={_attr(k)} type="{c.type}"/>\n')
        fh.write("    </attributes>\n")
        fh.write('    <attributes class="edge" mode="static">\n')
        fh.write('      <attribute id="0" title="signed_weight" type="double"/>\n')
        for i, (k, c) in enumerate(edge_cols.items(), start=1):
            fh.write(f'      <attribute id="{i}" title={_attr(k)} type="{c.type}"/>\n')
        fh.write("    </attributes>\n")
        fh.write("    <nodes>\n")
        v = node_cols
        row = ("      <node id=%s label=%s><attvalues>"
               + "".join(f'<attvalue for="{i}" value={c.slot}/>' for i, c in enumerate(n_attrs.values()))
               + f'</attvalues><viz:size value={v["size"].slot}/><viz:position x={v["x"].slot} y={v["y"].slot} '
               f'z="0.0"/><viz:color r={v["r"].slot} g={v["g"].slot} b={v["b"].slot}/></node>\n')
        _rows(fh, g.num_nodes, row, [lambda a, b: ids[a:b].tolist(), v["label"].texts]
              + [c.texts for c in n_attrs.values()] + [v[k].texts for k in ("size", "x", "y", "r", "g", "b")])
        fh.write("    </nodes>\n    <edges>\n")
        row = ('      <edge id="%s" source=%s target=%s weight="%s"><attvalues><attvalue for="0" value="%s%s"/>'
               + "".join(f'<attvalue for="{i}" value={c.slot}/>' for i, c in enumerate(edge_cols.values(), start=1))
               + "</attvalues></edge>\n")
        _rows(fh, g.num_edges, row, [lambda a, b: _number_texts(np.arange(a, b)), lambda a, b: ids[src[a:b]].tolist(),
                                     lambda a, b: ids[dst[a:b]].tolist(), weights.magnitude, weights.sign,
                                     weights.magnitude] + [c.texts for c in edge_cols.values()])
        fh.write("    </edges>\n  </graph>\n</gexf>\n")
