"""Many graphs of one model in one folder: the output of ``connectome extract``.

A *category store* holds the graphs of one run (one per image category) in one Zarr v3
group: the topology (layers, units, ``src``/``dst``) once, and per category its columns as
rows of chunked, compressed 2-D arrays (``edge/<column>``: categories x edges,
``node/<column>``: categories x units). ``manifest.json`` lists the complete categories; a
category is listed only after all its columns are on disk, so a store is also the
checkpoint of the run that writes it (a killed or failed run leaves every category it
finished readable, and a rerun continues with the next one). Zarr rather than a format of
our own: dask, xarray and zarr itself open the arrays directly (``dask.array.from_zarr``),
on local disk or object storage, and its chunks are compressed with zstd (with zstd's
frame checksum, so a damaged chunk is an error, never silently wrong numbers).

Edge flows are stored as float32 by default (the sums are float64 in memory; each value is
rounded to the nearest float32, a relative error of at most 2**-24), float64 on request.
Node columns (attribution, activation statistics, examples) keep their dtype.

::

    DIR/zarr.json            the group; attribute "connectome_store": format, version, run, layers, dtype
    DIR/topology/{node_units,src,dst}
    DIR/edge/weight, DIR/edge/abs_weight ...   rows = categories
    DIR/node/attribution ...                   rows = categories
    DIR/circuit/units       per category, 1 for the units of its circuit (mass 0.8), 0 else
    DIR/meta/<row>.json     each category's meta
    DIR/manifest.json       {"categories": {name: {"row": r, ...}}}: the complete ones
    DIR/extract.lock        while a run writes

:class:`WriterLock` keeps a second writer out of a folder while a run writes into it;
:func:`open_folder` opens a store, or an older folder of ``.npz`` files and ``index.json``,
as a read-only mapping category -> Connectome.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import time
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from connectome._files import _pid_alive, atomic_write
from connectome.errors import BadFileError, ConnectomeError
from connectome.graph import Connectome, Layer
from connectome.npzformat import FORMAT, _check_header

__all__ = ["CategoryStore", "StoreWriter", "FolderOfGraphs", "WriterLock", "open_folder", "is_store",
           "LOCK_NAME", "STORE_FORMAT", "STORE_VERSION"]

LOCK_NAME = "extract.lock"
STORE_FORMAT = "connectome-category-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
EDGE_CHUNK = 1 << 17  # edges per chunk: 512 KiB of float32; a window over 1,000 categories is 512 MB
FLOW_DTYPES = ("float32", "float64")
CIRCUIT_MASS = 0.8  # the circuit stored per category (for circuit overlaps across categories)
_INT_FILL = np.iinfo(np.int64).min  # never a value of an integer column: a missing chunk reads as this


class WriterLock:
    """An exclusive lock on an output folder: the file ``FOLDER/extract.lock`` naming its holder.

    The lock file holds the holder's pid, host and start time as JSON. It is created with
    ``os.link`` from a complete temporary file, so it exists only with its contents and two
    writers can never both create it. A lock left by a process that no longer runs on this
    host is taken over with a warning; a lock of a live process, or of another host (whose
    processes cannot be asked), is refused. Released (deleted) on exit from the ``with`` block.

    Parameters
    ----------
    folder : str or Path
        The output folder (created if missing).
    what : str
        How the folder is named in messages (e.g. ``"--out 'graphs'"``).

    Raises
    ------
    ConnectomeError
        Another live writer holds the folder.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what or repr(str(folder))
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.held = False

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{LOCK_NAME}.{self.mine['pid']}.{int(self.mine['started'] * 1e6)}.tmp"
        tmp.write_text(json.dumps(self.mine), encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic, and fails when the lock exists
                    self.held = True
                    return
                except FileExistsError:
                    pass
                holder = self._holder()
                if holder is None:  # released meanwhile: try again
                    continue
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == self.mine["host"] and not _pid_alive(pid):
                    warnings.warn(f"{self.what}: taking over the lock of process {pid}, which is no longer running "
                                  "(a run that was killed)", stacklevel=3)
                    os.replace(tmp, self.path)
                    if self._holder() == self.mine:  # another process taking over at once would win here
                        self.held = True
                        return
                    tmp.write_text(json.dumps(self.mine), encoding="utf-8")
                    continue
                who = f"process {pid} on {host}" if isinstance(pid, int) else "another process (unreadable lock)"
                raise ConnectomeError(
                    f"{self.what} is being written by {who}; wait for that run to end, or delete "
                    f"{str(self.path)!r} if it is no longer running"
                )
            raise ConnectomeError(f"{self.what}: could not take the lock {str(self.path)!r}; try again")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and self._holder() == self.mine:
            self.path.unlink(missing_ok=True)
        self.held = False


# ----------------------------------------------------------------------------- reading
def is_store(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding a category store (its ``zarr.json`` says so)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(attrs, dict) and "connectome_store" in attrs


def open_folder(path: str | os.PathLike[str]) -> Mapping[str, Connectome]:
    """The graphs of an extract output folder, as a read-only mapping category -> Connectome.

    A category store opens as a :class:`CategoryStore`; an older folder of ``.npz`` files
    listed in ``index.json`` as a :class:`FolderOfGraphs`. Both read a category only when it
    is asked for.

    Raises
    ------
    BadFileError
        The folder is neither, or its index is damaged.
    """
    p = Path(path)
    if (p / "zarr.json").is_file():
        return CategoryStore(p)
    if (p / "index.json").is_file():
        return FolderOfGraphs(p)
    raise BadFileError(f"no such file: {str(p)!r} is a folder, and not one written by `connectome extract` (no "
                       "category store, no index.json); pass a .npz file or an extract output folder")


def _unknown(name: str, names: Sequence[str], where: str) -> KeyError:
    close = difflib.get_close_matches(str(name), list(names), n=3)
    hint = f"; did you mean {close}?" if close else f"; it has {len(names)} categories"
    return KeyError(f"no category {name!r} in {where}{hint}")


class FolderOfGraphs(Mapping[str, Connectome]):
    """An older extract output folder (one ``.npz`` per category and ``index.json``), read lazily."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            cats = json.loads((self.path / "index.json").read_text(encoding="utf-8"))["categories"]
            self.files = {str(c): str(entry["file"]) for c, entry in cats.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise BadFileError(f"folder {str(self.path)!r}: index.json is damaged ({type(exc).__name__}); "
                               "run extract again or pass the .npz files") from None

    def __getitem__(self, name: str) -> Connectome:
        if name not in self.files:
            raise _unknown(name, list(self.files), repr(str(self.path)))
        return Connectome.from_npz(self.path / self.files[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FolderOfGraphs({str(self.path)!r}, {len(self)} categories)"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadFileError(f"{what}: {path.name} is missing; the store is damaged") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadFileError(f"{what}: {path.name} cannot be read ({type(exc).__name__}); the store is damaged") from None


def _listed(manifest: Any) -> dict[str, dict[str, Any]] | None:
    """The ``categories`` of a manifest when each has a row (an int >= 0), else None (damaged)."""
    cats = manifest.get("categories") if isinstance(manifest, dict) else None
    if isinstance(cats, dict) and all(isinstance(e, dict) and isinstance(e.get("row"), int) and e["row"] >= 0
                                      for e in cats.values()):
        return cats
    return None


class CategoryStore(Mapping[str, Connectome]):
    """A category store, opened read-only: a mapping category -> :class:`Connectome`.

    Opening reads two small JSON files (the group's attributes and the manifest), no
    array. ``store[name]`` reads that category's columns (and, the first time, the
    topology, which every category then shares: its arrays are not copied). Categories come
    in the order they were written.

    Parameters
    ----------
    path : str or Path
        The folder.

    Attributes
    ----------
    path : Path
    run : dict
        What made the graphs (model, data, target ...).
    dtype : str
        On-disk dtype of edge flows (``float32`` or ``float64``).

    Raises
    ------
    BadFileError
        Not a store, a store of a newer format, or a damaged manifest.

    Examples
    --------
    >>> store = cn.load("graphs/")                       # doctest: +SKIP
    >>> g = store["tabby"]                               # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        where = f"store {str(self.path)!r}"
        root = _read_json(self.path / "zarr.json", where)
        info = root.get("attributes", {}).get("connectome_store") if isinstance(root, dict) else None
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise BadFileError(f"{where} is a Zarr group but not a connectome category store; "
                               "pass a folder written by `connectome extract`")
        version = info.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BadFileError(f"{where} has the format version {version!r}; the store is damaged")
        if version > STORE_VERSION:
            raise BadFileError(f"{where} was written by a newer connectome (store format v{version}, this one reads "
                               f"v{STORE_VERSION}); upgrade torch-connectome")
        self.info = info
        self.run = dict(info.get("run") or {})
        self.dtype = str(info.get("dtype"))
        if self.dtype not in FLOW_DTYPES:
            raise BadFileError(f"{where} declares the flow dtype {self.dtype!r}; the store is damaged")
        manifest = _read_json(self.path / MANIFEST, where) if (self.path / MANIFEST).exists() else {"categories": {}}
        cats = _listed(manifest)
        if cats is None:
            raise BadFileError(f"{where}: {MANIFEST} is damaged (categories without rows); "
                               "the categories cannot be found")
        for part in sorted(self.path.glob("manifest.rank*.json")):  # a run split across processes
            more = _listed(_read_json(part, where))
            if more is None:
                raise BadFileError(f"{where}: {part.name} is damaged (categories without rows)")
            cats = {**cats, **{k: v for k, v in more.items() if k not in cats}}
        if len({e["row"] for e in cats.values()}) != len(cats):
            raise BadFileError(f"{where}: two categories claim one row in {MANIFEST}; the store is damaged")
        cats = dict(sorted(cats.items(), key=lambda kv: kv[1]["row"]))
        self._entries: dict[str, dict[str, Any]] = cats
        self._topology: tuple[tuple[Layer, ...], np.ndarray, np.ndarray, np.ndarray] | None = None
        self._arrays: dict[str, Any] = {}
        self._group: Any = None

    # ------------------------------------------------------------------ mapping
    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"CategoryStore({str(self.path)!r}, {len(self)} categories, flows {self.dtype})"

    def __getitem__(self, name: str) -> Connectome:
        entry = self._entry(name)
        layers, units, src, dst = self.topology()
        meta = self.category_meta(name)
        cols = meta["columns"]
        edge = {c: self._row("edge", c, name, entry, meta) for c in cols["edge"]}
        node = {c: self._row("node", c, name, entry, meta) for c in cols["node"]}
        weight = edge.pop("weight")
        g_meta = {**meta["meta"], "store": {"dtype": self.dtype, "rounding": _rounding(self.dtype)}}
        try:
            return Connectome(layers, units, src, dst, weight, edge, node, g_meta)
        except ConnectomeError as exc:
            raise BadFileError(f"store {str(self.path)!r}, category {name!r}: {exc}") from None

    def entry(self, name: str) -> dict[str, Any]:
        """The manifest entry of ``name``: row, ``n_images``, ``completeness_residual``."""
        return dict(self._entry(name))

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise _unknown(name, list(self._entries), f"store {str(self.path)!r}") from None

    # ------------------------------------------------------------------ parts
    def category_meta(self, name: str) -> dict[str, Any]:
        """``{"meta": graph meta, "columns": {"edge": [...], "node": [...]}, "crc32": {...}}`` of ``name``."""
        entry = self._entry(name)
        what = f"store {str(self.path)!r}, category {name!r}"
        m = _read_json(self.path / "meta" / f"{entry['row']}.json", what)
        cols = m.get("columns") if isinstance(m, dict) else None
        if not (isinstance(cols, dict) and isinstance(m.get("meta"), dict) and isinstance(m.get("crc32"), dict)
                and m.get("name") == name and isinstance(cols.get("edge"), list) and "weight" in cols["edge"]
                and isinstance(cols.get("node"), list)):
            raise BadFileError(f"{what}: its meta file is damaged or belongs to another category")
        return m

    def group(self) -> Any:
        """The Zarr group (read-only)."""
        if self._group is None:
            import zarr

            try:
                self._group = zarr.open_group(str(self.path), mode="r")
            except Exception as exc:  # noqa: BLE001 - zarr raises many kinds
                raise BadFileError(f"store {str(self.path)!r} cannot be opened ({type(exc).__name__}: {exc})") from None
        return self._group

    def array(self, kind: str, column: str) -> Any:
        """The Zarr array ``kind/column`` (rows: categories), e.g. ``array("edge", "weight")``."""
        key = f"{kind}/{column}"
        if key not in self._arrays:
            try:
                self._arrays[key] = self.group()[key]
            except KeyError:
                raise BadFileError(f"store {str(self.path)!r} has no column {key!r}; the store is damaged") from None
        return self._arrays[key]

    def layers(self) -> tuple[Layer, ...]:
        """The layers, from the group's attributes (no array read)."""
        header = {"format": FORMAT, "version": 1, "layers": self.info.get("layers"), "meta": {},
                  "node_attrs": [], "edge_attrs": []}
        return tuple(_check_header(header, f"store {str(self.path)}"))

    def topology(self) -> tuple[tuple[Layer, ...], np.ndarray, np.ndarray, np.ndarray]:
        """``(layers, node_units, src, dst)``, read once and shared (read-only) by every category."""
        if self._topology is None:
            from connectome.graph import is_canonical

            where = f"store {str(self.path)!r}"
            if self.info.get("layers") is None:
                raise BadFileError(f"{where} holds no category yet")
            layers = self.layers()
            n = sum(l.size for l in layers)
            try:
                units = np.asarray(self.array("topology", "node_units")[:], dtype=np.int64)
                src = np.asarray(self.array("topology", "src")[:], dtype=np.int64)
                dst = np.asarray(self.array("topology", "dst")[:], dtype=np.int64)
            except BadFileError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise BadFileError(f"{where}: the topology is damaged ({type(exc).__name__}: {exc})") from None
            if units.shape != (n,) or src.shape != dst.shape or src.shape != (self.info.get("n_edges"),):
                raise BadFileError(f"{where}: the topology arrays do not fit its layers; the store is damaged")
            offsets = np.zeros(len(layers) + 1, dtype=np.int64)
            np.cumsum([l.size for l in layers], out=offsets[1:])
            for a in (units, src, dst):
                a.setflags(write=False)
            if not is_canonical(src, dst, offsets, remember=True):  # later graphs skip the check
                raise BadFileError(f"{where}: the edges are not in canonical order or point outside the layers; "
                                   "the store is damaged")
            self._topology = (layers, units, src, dst)
        return self._topology

    def _row(self, kind: str, column: str, name: str, entry: dict[str, Any], meta: dict[str, Any]) -> np.ndarray:

        arr = self.array(kind, column)
        what = f"store {str(self.path)!r}, category {name!r}, column {kind}/{column}"
        try:
            v = np.ascontiguousarray(arr[entry["row"]])
        except Exception as exc:  # noqa: BLE001 - a damaged chunk (zstd checksum), a missing row
            raise BadFileError(f"{what} is damaged ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                               "extract this category again") from None
        if zlib.crc32(v) != meta["crc32"].get(f"{kind}/{column}"):
            raise BadFileError(f"{what} is damaged (its checksum does not match: a chunk is missing or changed); "
                               "extract this category again")
        v.setflags(write=False)
        return v

    def rows(self, names: Sequence[str] | None = None) -> np.ndarray:
        """The array rows of ``names`` (default: every category, in order)."""
        names = list(self) if names is None else list(names)
        return np.array([self._entry(n)["row"] for n in names], dtype=np.int64)

    def block(self, kind: str, column: str, rows: np.ndarray, start: int = 0, stop: int | None = None,
              crc: list[int] | None = None) -> np.ndarray:
        """``array(kind, column)[rows, start:stop]``: the rows of many categories over a range of columns.

        Each chunk is read and decompressed once, by a few threads, straight into the result:
        zarr's own fancy indexing costs many times the decompression when it fetches one small
        chunk per category (a window of 1,000 categories is 1,000 chunks). Arrays in another
        layout (another codec, chunks over several rows) are read through zarr. A chunk that is
        missing reads as the fill value (NaN, or the int64 minimum), as zarr reads it; one that
        does not decode raises (zstd's frame checksum).

        Parameters
        ----------
        kind, column : str
            As in :meth:`array`.
        rows : ndarray of int, shape (k,)
            Array rows (:meth:`rows`).
        start, stop : int
            Column range (default: all).
        crc : list of int, optional
            Running CRC-32 of each row, updated in place with the values read (by the reading
            threads): over consecutive ranges it ends as the CRC-32 of each whole row.

        Returns
        -------
        ndarray, shape (k, stop - start)
        """
        arr = self.array(kind, column)
        n = int(arr.shape[1])
        start, stop, _ = slice(start, stop).indices(n)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, max(0, stop - start)), dtype=arr.dtype)
        layout = _plain_layout(self.path / kind / column)
        if layout is None:
            for i, r in enumerate(rows):
                out[i] = arr[int(r), start:stop]
                if crc is not None:
                    crc[i] = zlib.crc32(out[i], crc[i])
            return out
        chunk, fill = layout
        folder = self.path / kind / column / "c"
        from numcodecs import Zstd

        zstd = Zstd()

        def read(i: int) -> None:  # row i, chunk by chunk
            for j in range(start // chunk, -(-stop // chunk)):
                a, b = max(start, j * chunk), min(stop, (j + 1) * chunk)
                try:
                    raw = (folder / str(int(rows[i])) / str(j)).read_bytes()
                except FileNotFoundError:
                    out[i, a - start:b - start] = fill
                    continue
                if a == j * chunk and b - a == chunk:  # a whole chunk (zarr writes the last one full size too)
                    zstd.decode(raw, out=out[i, a - start:b - start])
                else:
                    whole = np.frombuffer(zstd.decode(raw), dtype=out.dtype)
                    out[i, a - start:b - start] = whole[a - j * chunk:b - j * chunk]
            if crc is not None:
                crc[i] = zlib.crc32(out[i], crc[i])

        jobs = range(rows.size)
        if len(jobs) < 8:
            for job in jobs:
                read(job)
            return out
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # zstd releases the GIL
            for _ in pool.map(read, jobs):
                pass
        return out

    def dask(self, column: str = "weight", kind: str = "edge", names: Sequence[str] | None = None) -> Any:
        """``kind/column`` as a dask array, categories x edges (or units), rows in ``names`` order.

        Needs dask (an optional extra). On shared storage a dask cluster reads it in parallel.
        """
        import dask.array as da

        a = da.from_zarr(str(self.path), component=f"{kind}/{column}")
        return a[self.rows(names)]


def _plain_layout(folder: Path) -> tuple[int, Any] | None:
    """``(columns per chunk, fill value)`` of an array as :class:`StoreWriter` makes them (zarr v3,
    one row per chunk, little-endian bytes then zstd, keys ``c/<row>/<chunk>``), else None."""
    try:
        m = json.loads((folder / "zarr.json").read_text(encoding="utf-8"))
        shape = m["chunk_grid"]["configuration"]["chunk_shape"]
        codecs = [c["name"] for c in m["codecs"]]
        ok = (m.get("zarr_format") == 3 and m["chunk_grid"]["name"] == "regular" and len(shape) == 2
              and shape[0] == 1 and m["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
              and codecs == ["bytes", "zstd"] and m["codecs"][0].get("configuration", {}).get("endian") == "little"
              and m["data_type"] in ("float32", "float64", "int64"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
    if not ok:
        return None
    fill = m.get("fill_value")
    return int(shape[1]), (np.nan if fill == "NaN" else fill)


def _rounding(dtype: str) -> str:
    if dtype == "float32":
        return "each flow rounded to the nearest float32 (relative error <= 2**-24) from float64 sums"
    return "none: float64 sums as computed"


# ----------------------------------------------------------------------------- writing
class StoreWriter:
    """Writes categories into a store (creating it), one at a time; see the module docstring.

    A category is listed in the manifest only after its columns and its meta are on disk.
    Hold a :class:`WriterLock` on the folder while writing (``connectome extract`` does).

    Parameters
    ----------
    path : str or Path
        The folder: new, empty, or a store of the same ``run`` to add categories to.
    run : dict
        What makes the graphs (model, data, target ...); a store of another run is refused.
    dtype : {"float32", "float64"}, default "float32"
        On-disk dtype of edge flows.
    what : str, optional
        How the folder is named in messages.

    Raises
    ------
    ConnectomeError
        The folder holds something else (another run's store, an older output folder, files).
    BadFileError
        The folder's store is damaged or of a newer format.
    """

    def __init__(self, path: str | os.PathLike[str], run: Mapping[str, Any], dtype: str = "float32",
                 what: str | None = None, part: int | None = None):
        import zarr

        self.part = part  # process `part` of a run split across processes: its own rows and manifest
        self._mine: dict[str, dict[str, Any]] = {}
        if dtype not in FLOW_DTYPES:
            raise ValueError(f"dtype must be one of {FLOW_DTYPES}, got {dtype!r}")
        self.path = Path(path)
        self.what = what or f"store {str(self.path)!r}"
        self.run = json.loads(json.dumps(dict(run)))  # plain JSON values: compared with the stored ones
        self.dtype = dtype
        self._topology: tuple[tuple[Layer, ...], np.ndarray, np.ndarray, np.ndarray] | None = None
        self._arrays: dict[str, Any] = {}
        if (self.path / "zarr.json").exists():
            store = CategoryStore(self.path)
            for key in sorted(set(store.run) | set(self.run)):
                if store.run.get(key) != self.run.get(key):
                    raise ConnectomeError(
                        f"{self.what} holds graphs of another run ({key} {store.run.get(key)!r}, this run "
                        f"{self.run.get(key)!r}); choose another folder to keep both, or the same arguments to "
                        "continue it")
            if store.dtype != dtype:
                raise ConnectomeError(f"{self.what} stores flows as {store.dtype}, this run asks for {dtype}; "
                                      "choose another folder or the same dtype")
            self.entries = dict(store._entries)
            if part is not None:  # this process's part of an earlier, interrupted split run stays listed
                mine = self.path / f"manifest.rank{part}.json"
                old = _read_json(mine, self.what) if mine.exists() else {}
                self._mine = {k: v for k, v in (old.get("categories") or {}).items() if k in self.entries}
            self.info = dict(store.info)
            if self.info.get("layers") is not None:
                self._topology = store.topology()
            self._group = zarr.open_group(str(self.path), mode="r+")
        else:
            if part is not None:
                raise ConnectomeError(f"{self.what} is not a category store yet; process 0 creates it")
            if (self.path / "index.json").exists():
                raise ConnectomeError(f"{self.what} holds graphs of an older connectome (.npz files and index.json); "
                                      "choose a new folder for the category store")
            others = [p.name for p in self.path.iterdir() if not p.name.startswith((LOCK_NAME, f".{LOCK_NAME}"))] \
                if self.path.is_dir() else []
            if others:
                raise ConnectomeError(f"{self.what} is not empty and not a category store (it holds "
                                      f"{others[:3]}); choose a new or empty folder")
            self.path.mkdir(parents=True, exist_ok=True)
            self.info = {"format": STORE_FORMAT, "version": STORE_VERSION, "run": self.run, "dtype": dtype,
                         "rounding": _rounding(dtype), "layers": None, "n_edges": None,
                         "circuit_mass": CIRCUIT_MASS}
            self._group = zarr.open_group(str(self.path), mode="w", attributes={"connectome_store": self.info})
            self.entries = {}
            (self.path / "meta").mkdir(exist_ok=True)
            self._write_manifest()
        self._rows = max((e["row"] for e in self.entries.values()), default=-1) + 1
        self._capacity = max(self._rows, 1)

    @property
    def next_row(self) -> int:
        """The row the next new category gets."""
        return self._rows

    @property
    def done(self) -> list[str]:
        """The complete categories, in the order written."""
        return list(self.entries)

    def reserve(self, n_more: int) -> None:
        """Make room for ``n_more`` categories at once (one resize of each array for a whole run)."""
        self._grow(self._rows + max(0, int(n_more)))

    def _grow(self, rows: int) -> None:
        if self.part is not None:  # process 0 reserved the rows: never resize beside it
            return
        if rows <= self._capacity:
            return
        self._capacity = rows
        for a in self._arrays.values():
            if a.shape[0] < rows:
                a.resize((rows, a.shape[1]))

    def _array(self, kind: str, column: str, length: int, dtype: Any) -> Any:
        from zarr.codecs import BytesCodec, ZstdCodec

        key = f"{kind}/{column}"
        a = self._arrays.get(key)
        if a is None:
            if key in self._group:
                a = self._group[key]
                if a.shape[1] != length or a.dtype != dtype:
                    raise ConnectomeError(f"{self.what}: column {key} holds {a.dtype} x {a.shape[1]}, this run "
                                          f"{np.dtype(dtype)} x {length}; choose another folder")
                if a.shape[0] < self._capacity and self.part is None:
                    a.resize((self._capacity, length))
            elif self.part is not None:
                raise ConnectomeError(f"{self.what}: column {key} is not in the store; every process of a run "
                                      "must write the same columns")
            else:
                fill = np.nan if np.dtype(dtype).kind == "f" else _INT_FILL
                chunk = EDGE_CHUNK if kind == "edge" else max(1, length)
                a = self._group.create_array(key, shape=(self._capacity, length), chunks=(1, min(chunk, max(1, length))),
                                             dtype=dtype, fill_value=fill, serializer=BytesCodec(),
                                             compressors=ZstdCodec(level=1, checksum=True),
                                             config={"write_empty_chunks": True})
            self._arrays[key] = a
        return a

    def _write_topology(self, g: Connectome) -> None:
        from zarr.codecs import BytesCodec, ZstdCodec

        for name, v in (("node_units", g.node_units), ("src", g.src), ("dst", g.dst)):
            self._group.create_array(f"topology/{name}", data=np.asarray(v, dtype=np.int64),
                                     chunks=(min(1 << 20, max(1, v.size)),), serializer=BytesCodec(),
                                     compressors=ZstdCodec(level=3, checksum=True), overwrite=True)
        self.info.update(layers=[l.to_dict() for l in g.layers], n_edges=int(g.num_edges))
        self._group.attrs["connectome_store"] = self.info
        self._topology = (g.layers, g.node_units, g.src, g.dst)

    def _check_topology(self, name: str, g: Connectome) -> None:
        layers, units, src, dst = self._topology  # type: ignore[misc]
        if tuple(g.layers) != tuple(layers) or not (np.array_equal(g.node_units, units) and np.array_equal(g.src, src)
                                                    and np.array_equal(g.dst, dst)):
            raise ConnectomeError(f"{self.what}: the graph of category {name!r} has other layers or edges than the "
                                  "store's (another model, or other layers); choose another folder")

    def write(self, name: str, g: Connectome, circuit: np.ndarray | None = None, row: int | None = None) -> None:
        """Add category ``name`` (its row is reused when it is already there).

        ``circuit``: optional mask of ``g``'s units in its circuit, shape (n_nodes,);
        ``row``: the row to write (processes splitting a run agree on them beforehand).
        """
        name = str(name)
        if self._topology is None:
            self._write_topology(g)
        else:
            self._check_topology(name, g)
        if row is None:
            row = self.entries[name]["row"] if name in self.entries else self._rows
        self._grow(row + 1)
        if self.part is not None and row >= self._array("edge", "weight", g.num_edges, self.dtype).shape[0]:
            raise ConnectomeError(f"{self.what}: row {row} was not reserved by process 0")
        crc: dict[str, int] = {}
        columns: dict[str, list[str]] = {"edge": [], "node": []}
        for col, v in [("weight", g.weight), *g.edge_attrs.items()]:
            vv = np.ascontiguousarray(v, dtype=self.dtype)
            self._array("edge", col, g.num_edges, self.dtype)[row] = vv
            crc[f"edge/{col}"] = zlib.crc32(vv)
            columns["edge"].append(col)
        for col, v in g.node_attrs.items():
            kind = np.asarray(v).dtype.kind
            if kind not in "fiub":
                raise ConnectomeError(f"{self.what}: node column {col!r} of category {name!r} is not numeric "
                                      f"({np.asarray(v).dtype}); a store holds numeric columns")
            dtype = np.float64 if kind == "f" else np.int64
            vv = np.ascontiguousarray(v, dtype=dtype)
            self._array("node", col, g.num_nodes, dtype)[row] = vv
            crc[f"node/{col}"] = zlib.crc32(vv)
            columns["node"].append(col)
        if circuit is not None and (self.part is None or "circuit/units" in self._group):
            vv = np.ascontiguousarray(circuit, dtype=np.int64)
            self._array("circuit", "units", g.num_nodes, np.int64)[row] = vv
            crc["circuit/units"] = zlib.crc32(vv)
        with atomic_write(self.path / "meta" / f"{row}.json", "w") as fh:
            json.dump({"name": name, "meta": g.meta, "columns": columns, "crc32": crc}, fh)
        self.entries[name] = self._mine[name] = {"row": row, "n_images": g.meta.get("n_images"),
                                                 "completeness_residual": g.meta.get("completeness_residual")}
        self._rows = max(self._rows, row + 1)
        self._write_manifest()

    def _write_manifest(self) -> None:
        name, entries = (MANIFEST, self.entries) if self.part is None else (f"manifest.rank{self.part}.json", self._mine)
        with atomic_write(self.path / name, "w") as fh:
            json.dump({"format": STORE_FORMAT, "version": STORE_VERSION, "categories": entries}, fh)

    def merge_parts(self) -> None:
        """Fold the manifests of the other processes of a split run into the manifest, then remove them."""
        parts = sorted(self.path.glob("manifest.rank*.json"))
        if not parts:
            return
        self.entries = dict(CategoryStore(self.path)._entries)  # this manifest and every part, by row
        self._rows = max((e["row"] for e in self.entries.values()), default=-1) + 1
        self._write_manifest()
        for p in parts:
            p.unlink(missing_ok=True)
