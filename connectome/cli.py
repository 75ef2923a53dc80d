"""The ``connectome`` command.

Every subcommand imports what it needs when it runs, so ``--help`` is instant. Reports go
to stdout, progress and logs to stderr; ``--json`` prints machine-readable results. Errors
from the library print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn, Sequence

from connectome._text import printable, printable_lines
from connectome.errors import ConnectomeError

__all__ = ["main"]

EXAMPLES = {
    "weights": "connectome weights torchvision:resnet18 --input-shape 3,224,224 --out resnet18.npz",
    "extract": "connectome extract zoo:simplecnn_a zoo:shapes --out graphs/ --per-sample",
    "report": "connectome report graphs:circle --top 10 --out report/",
    "compare": "connectome compare graphs:circle graphs:ring --json",
    "export": "connectome export graphs:circle --format graphml --prune-top-k 8 --out circle.graphml",
    "view": "connectome view graphs/ --out viewer.html",
    "demo": "connectome demo --out demo_out",
    "zoo": "connectome zoo list",
    "functional": "connectome functional zoo:simplecnn_a zoo:shapes --method pearson --out functional.npz",
    "lesion": "connectome lesion zoo:smallresnet zoo:shapes:8 --order pagerank --random 5 --out lesion.json --plot attack.png",
    "trajectory": "connectome trajectory zoo:simplecnn_a zoo_weights/checkpoints/simplecnn_a --out trajectory.json",
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser; its usage errors quote the arguments (``unrecognized arguments: ...``),
    which may be file names: printed :func:`printable` (the subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        super().error(printable_lines(message))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="connectome",
        description="Trained neural networks as connectomes: extract, analyse and draw their wiring.",
        epilog="Example: " + EXAMPLES["demo"],
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=f"Example: {EXAMPLES[name]}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    model_help = ("torchvision:NAME, zoo:NAME, package.module:factory or file.py:factory")
    w = add("weights", "Write the static weight connectome of a model (.npz).")
    w.add_argument("model", metavar="MODEL", help=model_help)
    w.add_argument("--input-shape", default=None, help="C,H,W of one input (default: the model's usual size)")
    w.add_argument("--weights", default=None, help="state_dict FILE, or DEFAULT for torchvision's pretrained weights")
    w.add_argument("--reduce", default="sum", choices=["sum", "l1", "l2"], help="kernel reduction (default sum)")
    w.add_argument("--out", required=True, help="output .npz")

    e = add("extract", "Extract one attribution graph per image category into a category store (DIR).")
    e.add_argument("model", metavar="MODEL", help=model_help)
    e.add_argument("data", metavar="DATA", help="ImageFolder directory (ROOT/<category>/<images>) or zoo:shapes[:N]")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--weights", default=None, help="state_dict FILE, or DEFAULT for torchvision's pretrained weights")
    e.add_argument("--target", default="label", help="label (default), predicted, or a class index/name")
    e.add_argument("--per-sample", action="store_true", help="also sum |flow| per image (abs_weight)")
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    e.add_argument("--precision", default="exact", choices=["exact", "tf32", "bf16"],
                   help="float32 arithmetic: exact (default; TF32 off), tf32 or bf16 (faster on GPUs, approximate)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-images", type=int, default=None, help="at most this many images per category")
    e.add_argument("--image-size", type=int, default=None, help="resize/crop ImageFolder images to this size")
    e.add_argument("--categories", default=None, help="comma-separated category names (default: all)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--num-workers", type=int, default=None,
                   help="worker processes decoding images (default: one fewer than the CPUs, at most 8)")
    e.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="folder for a resumable run: rerun the same command to continue after an interruption")
    e.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="batches between checkpoints (default 50)")
    e.add_argument("--examples", type=int, default=0, metavar="K",
                   help="also keep each unit's top K images (dataset examples for unit cards and the viewer)")
    e.add_argument("--layout", default="store", choices=["store", "npz"],
                   help="store (default): one Zarr category store in --out, each category written as it "
                        "finishes, a rerun continues it; npz: one .npz per category and index.json (older layout)")
    e.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="store: on-disk dtype of the edge flows (default float32; sums are float64 in memory)")
    e.add_argument("--no-circuits", action="store_true",
                   help="store: do not store each category's circuit (saves seconds per category on large models; "
                        "compare then has no circuit overlaps)")

    r = add("report", "Analyse one graph: hubs, communities, circuit; print and write report.html.")
    r.add_argument("graph", metavar="GRAPH", help="a .npz graph, or DIR:CATEGORY of a folder written by extract")
    r.add_argument("--top", type=int, default=10, help="top units to list (default 10)")
    r.add_argument("--json", action="store_true", help="print machine-readable results instead of tables")
    r.add_argument("--out", default=None, help="directory for report.html and PNGs")
    r.add_argument("--seed", type=int, default=0, help="seed of Leiden and of sampled betweenness (default 0)")
    _circuit_options(r)
    r.add_argument("--measures", default=None, metavar="M,M",
                   help="centralities to compute, comma-separated, e.g. strength,pagerank,betweenness "
                        "(default strength,pagerank and flow on attribution graphs)")
    r.add_argument("--betweenness-samples", default="auto", metavar="auto|N|exact",
                   help="sources sampled for betweenness: auto (exact on small graphs, sampled on large ones; "
                        "default), a number, or exact (hours on ResNet-50)")
    r.add_argument("--html", action="store_true", help="also write the interactive viewer.html next to report.html")
    r.add_argument("--data", default=None, help="the images the graph's examples index (default: as recorded)")

    c = add("compare", "Compare two graphs of one model: shared and analogous units and circuits.")
    c.add_argument("a", metavar="A", help="graph of the first category (.npz or DIR:CATEGORY)")
    c.add_argument("b", metavar="B", nargs="?", default=None,
                   help="graph of the second category, same model (.npz or DIR:CATEGORY); without B, A is a "
                        "folder written by extract and all its categories are compared")
    c.add_argument("--top", type=int, default=20, help="most important units per layer compared (default 20)")
    c.add_argument("--json", action="store_true", help="print machine-readable results instead of tables")
    c.add_argument("--out", default=None, help="directory for report.html and PNGs")
    c.add_argument("--mass", type=float, default=0.8,
                   help="fraction of the flow per layer the compared circuits carry (default 0.8)")
    c.add_argument("--time-budget", type=float, default=5.0, metavar="SECONDS",
                   help="seconds for the search of A's circuit skeleton in B's graph (default 5)")
    c.add_argument("--dask", default=None, metavar="ADDRESS",
                   help="all categories of a store: compute the flow correlations with dask, on the cluster whose "
                        "scheduler is at ADDRESS (tcp://host:8786; the store on storage every worker reads), or "
                        "'local' for dask's threads here (needs pip install 'connectome[dask]')")

    x = add("export", "Export a graph to GraphML or GEXF for Gephi.")
    x.add_argument("graph", metavar="GRAPH", help="a .npz graph, or DIR:CATEGORY of a folder written by extract")
    x.add_argument("--format", default=None, choices=["graphml", "gexf"],
                   help="file format (default: from the extension of --out, .graphml or .gexf)")
    x.add_argument("--prune-top-k", type=int, default=None, metavar="K",
                   help="keep the K strongest non-zero inputs per unit (8 keeps a ResNet-50 file small enough for Gephi)")
    x.add_argument("--annotate", action="store_true",
                   help="add centralities (strength, pagerank, flow), the Leiden community (node colour) and "
                        "in_circuit as node columns, computed on the whole graph before pruning")
    x.add_argument("--out", required=True, help="output file (.graphml or .gexf)")
    x.add_argument("--examples", default=None, metavar="DIR",
                   help="write each unit's top image patches as PNG files into DIR (graph extracted with --examples)")
    x.add_argument("--data", default=None, help="the images the graph's examples index (default: as recorded)")

    v = add("view", "Write the interactive circuit viewer: one self-contained HTML file.")
    v.add_argument("graphs", metavar="GRAPH", nargs="+",
                   help=".npz graphs (categories of one model), or a folder written by extract")
    v.add_argument("--out", default="viewer.html", help="output HTML file (default viewer.html)")
    v.add_argument("--data", default=None, help="the images the graphs' examples index (default: as recorded)")
    v.add_argument("--mass", type=float, default=0.9, help="largest circuit mass on the slider (default 0.9)")

    d = add("demo", "Run the whole toolkit on the embedded zoo and write a report.")
    d.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    d.add_argument("--quiet", action="store_true")

    _functional_parser(add("functional", "Write the functional connectivity of a model's units over images (.npz)."),
                       model_help)
    _lesion_parser(add("lesion", "Remove units cumulatively (targeted and random orders): accuracy per step."),
                   model_help)
    _trajectory_parser(add("trajectory", "Follow a model's connectome over training checkpoints."), model_help)

    z = add("zoo", "List or retrain the embedded zoo models.")
    z.add_argument("action", choices=["list", "train"], help="list the models, or train them from scratch")
    z.add_argument("--out", default="zoo_weights", metavar="DIR",
                   help="train: folder for the new weights (default zoo_weights/; never the installed package's)")
    z.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="train: also keep checkpoints every N optimizer steps in DIR/checkpoints/NAME/ "
                        "(for connectomes over training)")
    return p


def _circuit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mass", type=float, default=0.8,
                   help="fraction of the flow per layer the circuit carries (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep the K strongest units per layer in the circuit instead of --mass")
    p.add_argument("--max-units", type=int, default=150, metavar="N",
                   help="about N circuit units in all (at least one per layer), the strongest of each layer, so "
                        "that the figure stays readable on large models (default 150; 0: no cap)")


def _version() -> str:
    from connectome import __version__

    return f"connectome {__version__}"


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ConnectomeError(f"--input-shape {text!r} is not C,H,W such as 3,224,224") from None
    if not shape or any(v < 1 for v in shape):
        raise ConnectomeError(f"--input-shape {text!r} needs positive sizes, such as 3,224,224")
    _check_input_memory(f"--input-shape {text}", math.prod(shape), 1)
    return shape


def _memory_bytes() -> int | None:
    """Physical memory of this machine, when the OS says it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_input_memory(what: str, numel: int, batch: int) -> None:
    """Refuse inputs whose batch of float32 images alone would not fit in this machine's memory
    (the model's activations need more still): one line now instead of an allocation failure."""
    need = 4 * numel * batch
    limit = _memory_bytes() or (1 << 40)
    if need > limit:
        raise ConnectomeError(
            f"{what} needs {need / 2**30:,.1f} GiB for a batch of {batch} image(s) before the model runs; this machine "
            f"has {limit / 2**30:,.1f} GiB: use a smaller size" + (" or --batch-size" if batch > 1 else "")
        )


def _cmd_weights(a: argparse.Namespace) -> int:
    from connectome import extract
    from connectome.modelspec import load_model_spec

    spec = load_model_spec(a.model, a.weights)
    shape = _shape(a.input_shape) or spec.input_shape
    if shape is None:
        raise ConnectomeError(f"give --input-shape for {a.model!r} (for example 3,224,224)")
    _check_out_file(a.out, [a.weights, a.model.rpartition(":")[0]])  # the weights file, the model's .py
    g = extract.weights(spec.model, shape, reduce=a.reduce, labels=spec.classes, name=spec.name)
    g = g.with_meta(**spec.meta)  # what was assumed (random weights) travels with the graph
    g.save(a.out)
    print(printable_lines(g))
    print(f"wrote {printable(a.out)}", file=sys.stderr)
    return 0


def _check_out_file(path: str, inputs: Sequence[Any] = ()) -> None:
    """Refuse ``--out`` in a folder that does not exist, or naming one of the command's input
    files (also through a symbolic or hard link): writing it would replace the input."""
    parent = Path(path).parent
    if str(parent) and not parent.is_dir():
        raise ConnectomeError(f"cannot write {path!r}: folder {str(parent)!r} does not exist")
    if not os.path.exists(path):  # a file that does not exist is no input
        return
    for item in inputs:
        try:
            same = os.path.samefile(path, item)
        except (OSError, TypeError, ValueError):  # an input that is not a file here (torchvision:resnet18)
            continue
        if same:
            how = "" if os.path.abspath(path) == os.path.abspath(item) else " (the same file through a link)"
            raise ConnectomeError(f"--out {path!r} is the input {str(item)!r}{how}; writing it would replace "
                                  "the input: choose another --out")


def _check_out_dir(path: str | None) -> None:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ConnectomeError(f"--out {path!r} is a file; give a folder")


def _cmd_extract(a: argparse.Namespace) -> int:
    from connectome.extract.distributed import launched

    # Under torchrun (WORLD_SIZE > 1) this starts the process group: every process computes
    # its shard, all hold the combined graphs, and only rank 0 writes and prints.
    with launched(a.device) as (rank, _):
        return _extract(a, rank)


def _extract(a: argparse.Namespace, rank: int) -> int:
    from connectome.extract import iter_attribution_by_category
    from connectome.extract.distributed import agree
    from connectome.modelspec import load_data_spec, load_model_spec

    _check_out_dir(a.out)
    if a.batch_size < 1:
        raise ConnectomeError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.max_images is not None and a.max_images < 1:
        raise ConnectomeError(f"--max-images must be >= 1 image per category, got {a.max_images}")
    if a.image_size is not None:
        if a.image_size < 1:
            raise ConnectomeError(f"--image-size must be >= 1 pixel, got {a.image_size}")
        _check_input_memory(f"--image-size {a.image_size}", 3 * a.image_size**2, a.batch_size)
    if a.num_workers is not None and a.num_workers < 0:
        raise ConnectomeError(f"--num-workers must be >= 0, got {a.num_workers}")
    if a.checkpoint_every < 1:
        raise ConnectomeError(f"--checkpoint-every must be >= 1 batch, got {a.checkpoint_every}")
    if a.examples < 0:
        raise ConnectomeError(f"--examples must be >= 0 images per unit, got {a.examples}")

    spec = load_model_spec(a.model, a.weights)
    size = a.image_size or (spec.input_shape[-1] if spec.input_shape else None)
    data = load_data_spec(a.data, image_size=size)
    transform = None
    if isinstance(data, str) and size is not None:
        from connectome.extract.data import default_transform

        transform = default_transform(size)
    cats = [c.strip() for c in a.categories.split(",")] if a.categories else None
    where = (str(Path(a.data).resolve()) if isinstance(data, str) else a.data) if a.examples else None
    options = dict(categories=cats, batch_size=a.batch_size, transform=transform, progress=not a.quiet,
                   per_sample=a.per_sample, device=a.device, max_images=a.max_images, precision=a.precision,
                   name=spec.name, labels=spec.classes, num_workers=a.num_workers, checkpoint=a.checkpoint,
                   checkpoint_every=a.checkpoint_every, examples=a.examples)
    if a.layout == "store":
        return _extract_store(a, rank, spec, data, options, where)
    target: Any = a.target
    out = Path(a.out)
    new_index: dict[str, Any] = {"model": spec.name, "weights": a.weights, "data": a.data,
                                 "data_path": _data_path(a.data), "target": a.target, "complete": False,
                                 "categories": {}}
    # Hours of work must not end in a folder that cannot be written, nor in one another run is
    # writing: take the folder's lock and write the (partial, merged) index first. Every
    # process takes part in agree(), so none waits for a failed rank 0.
    from connectome.store import WriterLock

    error: BaseException | None = None
    lock = WriterLock(out, f"--out {a.out!r}") if rank == 0 else None
    index = new_index
    try:
        if lock is not None:
            try:
                _out_op(lock.acquire, a.out)
                index = _merged_index(out, new_index, a.out)
                _write_index(out, index, a.out)
            except BaseException as exc:  # noqa: BLE001 - re-raised by agree()
                error = exc
        agree(error)
        run = iter_attribution_by_category(spec.model, data, target, **options)
        old_files = {c: str(e["file"]) for c, e in index["categories"].items()}
        files = category_files(run.categories, existing=old_files)
        written, units = 0, []
        # Each category is written as it finishes: a failure later keeps every earlier one.
        for cname, g in run:
            error = None
            if rank == 0:
                try:
                    _write_category(out, index, a.out, cname, g, files[cname], where, spec.meta, units)
                    written += 1
                except BaseException as exc:  # noqa: BLE001 - re-raised by agree()
                    error = exc
            agree(error)
        if rank != 0:
            return 0
        if units:
            print("categories mapped to output units: " + ", ".join(units), file=sys.stderr)
        index["complete"] = True
        _write_index(out, index, a.out)
        print(f"wrote {written} graphs and index.json to {printable(str(out))}", file=sys.stderr)
        return 0
    finally:
        if lock is not None:
            lock.release()


def _extract_store(a: argparse.Namespace, rank: int, spec: Any, data: Any, options: dict[str, Any],
                   where: str | None) -> int:
    """``extract`` into a category store (see :mod:`connectome.store`): each category written as it
    finishes, the categories already in the store skipped (the store is the run's checkpoint)."""
    import functools

    from connectome.extract import iter_attribution_by_category
    from connectome.extract.flow import _shared_done, write_stream
    from connectome.store import StoreWriter

    run_info = {"model": spec.name, "weights": a.weights, "data": _data_path(a.data) or a.data, "target": a.target}
    units: list[str] = []

    def prepare(cname: str, g: Any) -> Any:
        return _with_run_meta(g, where, spec.meta)

    def written(cname: str, g: Any) -> None:
        _tell_written(cname, g, units)

    with _out_writer(a, run_info) as writer:
        done = _shared_done(writer)
        run = iter_attribution_by_category(spec.model, data, a.target, skip=done, **options)
        if rank == 0 and done and len(run):
            print(f"resuming: {len(done)} categories already in {printable(a.out)}, {len(run)} to go", file=sys.stderr)
        part = functools.partial(StoreWriter, a.out, run_info, dtype=a.dtype, what=f"--out {a.out!r}")
        n = write_stream(run, writer, prepare, written, circuits=not a.no_circuits, part=part)
    if rank != 0:
        return 0
    if units:
        print("categories mapped to output units: " + ", ".join(units), file=sys.stderr)
    print(f"wrote {n} categories to the store {printable(a.out)} ({len(done) + n} in all)", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _out_writer(a: argparse.Namespace, run_info: dict[str, Any]) -> Any:
    """The store writer of ``--out`` (process 0), a file system error as one line about ``--out``."""
    from connectome.extract.flow import _rank0_writer

    stack = contextlib.ExitStack()
    writer = _out_op(lambda: stack.enter_context(_rank0_writer(a.out, run_info, a.dtype, what=f"--out {a.out!r}")),
                     a.out)
    with stack:
        yield writer


def _out_op(fn: Any, given: str) -> Any:
    """``fn()``, with a file system error as one line about ``--out``."""
    try:
        return fn()
    except OSError as exc:
        raise ConnectomeError(f"cannot write to --out {given!r} ({exc.strerror or exc}); "
                              "choose a folder you can write to") from None


def _data_path(data: str) -> str | None:
    """The absolute path of a local data folder (``data/`` and ``./data`` are one), else None."""
    p = Path(data)
    return str(p.resolve()) if p.is_dir() else None


#: What an output folder's runs must share for their graphs to be listed in one index.json.
_SAME = {"model": "model", "weights": "--weights", "data": "data", "target": "--target"}


def _merged_index(out: Path, new: dict[str, Any], given: str) -> dict[str, Any]:
    """The index of ``out`` this run continues: the existing one (its categories kept) when it
    is of the same model, weights, data and target; a new one when there is none."""
    from connectome.store import is_store

    if is_store(out):
        raise ConnectomeError(f"--out {given!r} is a category store; choose another --out for --layout npz, or "
                              "leave --layout out to add to the store")
    path = out / "index.json"
    if not path.is_file():
        return new
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        cats = old["categories"]
        if not isinstance(cats, dict) or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                                  for e in cats.values()):
            raise TypeError("categories is not a mapping of name -> {file: ...}")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConnectomeError(f"--out {given!r}: its index.json is damaged ({type(exc).__name__}); move the folder "
                              "away or choose another --out") from None
    for key, what in _SAME.items():
        was, now = old.get(key), new.get(key)
        if key == "data" and old.get("data_path") and new.get("data_path"):
            was, now = old["data_path"], new["data_path"]
        if was != now:
            raise ConnectomeError(f"--out {given!r} holds graphs of another run ({what} {was!r}, this run {now!r}); "
                                  "choose another --out to keep both, or the same arguments to add categories")
    return {**new, "categories": dict(cats)}


def _write_category(out: Path, index: dict[str, Any], given: str, cname: str, g: Any, file: str,
                    where: str | None, spec_meta: dict[str, Any], units: list[str]) -> None:
    """Save one category's graph and list it in index.json (a run stopped later keeps it)."""
    g = _with_run_meta(g, where, spec_meta)
    g.save(out / file)
    index["categories"][cname] = {
        "file": file, "n_images": g.meta["n_images"], "completeness_residual": g.meta["completeness_residual"],
    }
    _write_index(out, index, given)
    _tell_written(cname, g, units)


def _with_run_meta(g: Any, where: str | None, spec_meta: dict[str, Any]) -> Any:
    """``g`` with where its images are (``view`` and ``report`` find the patches again) and what
    the model spec assumed (random weights ...) in its meta."""
    if where is not None:
        g = g.with_meta(examples={**g.meta["examples"], "data": where})
    return g.with_meta(**spec_meta)


def _tell_written(cname: str, g: Any, units: list[str]) -> None:
    """Print one line for a written category; note in ``units`` which output unit it was mapped
    to (said once at the end)."""

    tc, labels = g.meta.get("target_class"), g.layers[-1].labels
    if isinstance(tc, int):
        units.append(f"{printable(cname)} -> unit {tc}" + (f" ({printable(labels[tc])})" if labels and tc < len(labels) else ""))
    print(f"{printable(cname):>20}: {g.meta['n_images']:5d} images  {g.num_nodes} units  {g.num_edges} edges  "
          f"completeness residual {g.meta['completeness_residual']:.2e}")


def _write_index(out: Path, index: dict[str, Any], given: str) -> None:
    from connectome.io import atomic_write

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "index.json", "w") as fh:
            json.dump(index, fh, indent=2)

    _out_op(write, given)


def category_files(names: Sequence[str], existing: dict[str, str] | None = None) -> dict[str, str]:
    """One distinct ``.npz`` file name per category, stable from run to run.

    A category whose name is a safe, short file name keeps it (``circle.npz``); any other
    gets its safe characters, cut to a bounded length, and a hash of the full name
    (``a_b-c8687a08aa.npz``). Names that a case-insensitive or normalising file system
    (macOS, Windows) would merge, ``Cat`` and ``cat``, or one name in Unicode NFC and NFD
    form, all get the hash. ``existing`` (category -> file of an earlier run into the same
    folder) keeps those categories' files, and no new name may collide with them.
    """
    from connectome.io import file_stems, folded_name

    existing = dict(existing or {})
    every = list(existing) + [n for n in names if n not in existing]
    stems = file_stems(every)  # names a case-insensitive or normalising file system merges get hashes
    files = {n: existing.get(n) or f"{stems[n]}.npz" for n in every}
    if len({folded_name(f) for f in files.values()}) != len(files):
        raise ConnectomeError("two category names map to one file name even with their hashes; rename one category")
    return {n: files[n] for n in names}


def _cmd_report(a: argparse.Namespace) -> int:
    from connectome.reporting import graph_report

    _check_out_dir(a.out)
    if a.html and a.out is None:
        raise ConnectomeError("--html writes viewer.html next to report.html: give --out DIR")
    top_k, max_units = _circuit_args(a)
    measures = [m.strip() for m in a.measures.split(",") if m.strip()] if a.measures else None
    samples = _samples(a.betweenness_samples)
    g = _load_graph(a.graph)
    result = graph_report(g, top=a.top, out=a.out, seed=a.seed, mass=a.mass, top_k=top_k, max_units=max_units,
                          measures=measures, betweenness_samples=samples, images=a.data, viewer=a.html)
    if a.html:
        print(f"viewer: {printable(result.data['viewer'])}", file=sys.stderr)
    return _emit(result, a.json)


def _circuit_args(a: argparse.Namespace) -> tuple[int | None, int | None]:
    if not 0 < a.mass <= 1:
        raise ConnectomeError(f"--mass must be in (0, 1], got {a.mass}")
    if a.top_k is not None and a.top_k < 1:
        raise ConnectomeError(f"--top-k must be >= 1, got {a.top_k}")
    if a.max_units is not None and (a.max_units < 0 or a.max_units == 1):
        raise ConnectomeError(f"--max-units must be 0 (no cap) or >= 2, got {a.max_units}")
    return a.top_k, (a.max_units or None)


def _samples(text: str) -> Any:
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    if t in ("exact", "all", "none"):
        return None
    try:
        k = int(t)
    except ValueError:
        raise ConnectomeError(f"--betweenness-samples must be auto, exact or a number >= 2, got {text!r}") from None
    if k < 2:
        raise ConnectomeError(f"--betweenness-samples must be auto, exact or a number >= 2, got {text!r}")
    return k


def _emit(result: Any, as_json: bool) -> int:
    """Print a report: tables for people, or JSON for machines; the HTML path to stderr."""
    if as_json:
        print(json.dumps(result.data, indent=2, default=_json_default))  # ensure_ascii: escapes every control
    else:
        print(printable_lines(result.text))
    if result.path:
        print(f"report: {printable(result.path)}", file=sys.stderr)
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from connectome.reporting import compare_report

    _check_out_dir(a.out)
    if not 0 < a.mass <= 1:
        raise ConnectomeError(f"--mass must be in (0, 1], got {a.mass}")
    if not a.time_budget > 0:
        raise ConnectomeError(f"--time-budget must be positive seconds, got {a.time_budget}")
    if a.b is None:
        return _compare_store(a)
    ga, gb = _load_graph(a.a), _load_graph(a.b)
    return _emit(compare_report(ga, gb, top=a.top, out=a.out, mass=a.mass, time_budget=a.time_budget), a.json)


def _compare_store(a: argparse.Namespace) -> int:
    """``compare DIR``: every category of a store with every other; figures into ``--out``."""
    from connectome.analysis import compare_categories
    from connectome.store import CategoryStore, open_folder

    if not Path(a.a).is_dir():
        raise ConnectomeError(f"compare needs two graphs, or one folder written by extract; got only {a.a!r}")
    store = open_folder(a.a)
    if not isinstance(store, CategoryStore):
        raise ConnectomeError(f"{a.a!r} is an older folder of .npz files; compare all categories of a category store "
                              "(extract writes one), or name two graphs")
    if not a.dask:
        r = compare_categories(store)
    else:
        import importlib.util

        if importlib.util.find_spec("dask") is None or importlib.util.find_spec("distributed") is None:
            raise ConnectomeError("--dask needs dask: pip install 'connectome[dask]'")
        if a.dask == "local":
            r = compare_categories(store, use_dask=True)
        else:
            from distributed import Client

            try:
                client = Client(a.dask, timeout="5s")
            except (OSError, TimeoutError) as exc:
                raise ConnectomeError(f"--dask {a.dask!r}: no dask scheduler answers there ({type(exc).__name__}); "
                                      "start one (`dask scheduler`, and workers that see the store), or pass "
                                      "--dask local") from None
            with client:
                r = compare_categories(store, use_dask=True)
    if a.json:
        print(json.dumps(r.to_dict(), default=_json_default))
    else:
        print(r)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, plot in (("dendrogram.png", r.plot_dendrogram), ("sharing.png", r.plot_sharing)):
            _save_figure(str(out / name), plot().get_figure())
        _write_json(str(out / "categories.json"), r.to_dict())
        print(f"wrote dendrogram.png, sharing.png and categories.json to {a.out}", file=sys.stderr)
    return 0


#: export warns before writing a file larger than this (Gephi slows down well before).
EXPORT_WARN_BYTES = 100e6


def _cmd_export(a: argparse.Namespace) -> int:
    import numpy as np

    from connectome import io

    fmt = a.format or _format_from(a.out)
    if a.prune_top_k is not None and a.prune_top_k < 1:
        raise ConnectomeError(f"--prune-top-k must be >= 1, got {a.prune_top_k}")
    _check_out_file(a.out, _graph_inputs([a.graph]))
    g = _load_graph(a.graph)
    if a.annotate:
        g = _annotated(g)
    if a.prune_top_k is not None:
        # zero-weight edges (dead units of an attribution graph) carry nothing: never keep them
        g = g.prune(top_k=a.prune_top_k, threshold=float(np.finfo(np.float64).tiny))
    size = _export_size(g)
    if size > EXPORT_WARN_BYTES:
        hint = "" if a.prune_top_k else "; --prune-top-k 8 keeps each unit's 8 strongest inputs"
        print(f"connectome export: warning: {printable(a.out)} will be about {size / 1e6:,.0f} MB ({g.num_edges:,} edges){hint}",
              file=sys.stderr)
    if a.examples is not None:
        g = _write_patches(g, a.examples, a.data, Path(a.out).parent)
    (io.write_graphml if fmt == "graphml" else io.write_gexf)(g, a.out)
    print(f"wrote {printable(a.out)} ({fmt}, {g.num_nodes} nodes, {g.num_edges} edges)", file=sys.stderr)
    return 0


def _format_from(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".graphml", ".gexf"):
        return suffix[1:]
    raise ConnectomeError(f"cannot tell the format of {path!r} from its extension; name it .graphml or .gexf, "
                          "or pass --format graphml|gexf")


def _export_size(g: Any) -> float:
    """Bytes a GraphML/GEXF file of ``g`` takes, about: each edge names both ends and carries
    ``weight``, ``signed_weight`` and every edge column; each node every column."""
    import numpy as np

    id_len = float(np.mean([len(s) for s in g.node_ids[:: max(1, g.num_nodes // 1000)].tolist()])) if g.num_nodes else 0.0
    per_edge = 2 * id_len + 60 + 40 * (2 + len(g.edge_attrs))
    per_node = id_len + 120 + 40 * (10 + len(g.node_attrs))
    return g.num_edges * per_edge + g.num_nodes * per_node


def _annotated(g: Any) -> Any:
    """``g`` with centralities, Leiden communities and the circuit as node columns."""
    from connectome import analysis as an

    measures = an.default_measures(g, betweenness=False)
    c = an.centrality(g, measures)
    try:
        p = an.communities(g, seed=0)
    except ConnectomeError as exc:
        print(f"connectome export: communities skipped ({printable(_one_line(exc))})", file=sys.stderr)
        p = None
    try:
        circ = an.circuit(g, mass=0.8)
    except ConnectomeError:
        circ = None  # a weight graph has no class to trace a circuit to
    return an.annotate(g, centrality=c, partition=p, circuit=circ)


def _write_patches(g: Any, folder: str, data: str | None, beside: Path) -> Any:
    """Each unit's top patches as one PNG strip ``DIR/<graph>-<key>/<layer>_<unit>.png``; returns
    ``g`` with the file of each unit (relative to the exported file's folder) as node attribute
    ``example_file``.

    The subfolder is named by the graph (its category or model) and
    :func:`connectome.patches.examples_key`, so graphs exported into one ``DIR`` keep their own
    patches; file names are distinct also where the file system ignores case or Unicode
    normalisation (:func:`connectome.io.file_stems`).
    """
    import numpy as np

    from connectome.io import atomic_write, file_stem, file_stems
    from connectome.patches import examples_key, has_examples, image_source, unit_patches
    from connectome.viz.units import patch_strip, png_bytes

    if not has_examples(g):
        raise ConnectomeError("--examples: the graph has no dataset examples; extract it with --examples K")
    images = image_source(g, data)
    if images is None:
        raise ConnectomeError("--examples: the graph does not record where its images are; pass --data DATA")
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ConnectomeError(f"--examples {folder!r} is a file; give a folder")
    label = str(g.meta.get("category") or g.meta.get("model") or "graph")
    out = Path(folder) / f"{file_stem(label, max_bytes=40)}-{examples_key(g, data)}"
    out.mkdir(parents=True, exist_ok=True)
    patches = unit_patches(g, images, n=8, size=48)
    stems = file_stems(nid.replace(":", "_") for nid in patches)  # "layer:3" -> "layer_3", one to one
    files = np.full(g.num_nodes, "", dtype=object)
    for nid, items in patches.items():
        name = stems[nid.replace(":", "_")] + ".png"
        with atomic_write(out / name) as fh:
            fh.write(png_bytes(patch_strip([p["patch"] for p in items], 48)))
        files[g.index_of(nid)] = os.path.relpath(out / name, beside)
    print(f"wrote {len(patches)} unit patch strips to {printable(str(out))}", file=sys.stderr)
    return g.with_node_attrs(example_file=files.astype(str))


def _cmd_view(a: argparse.Namespace) -> int:
    from connectome.viz.viewer import write_viewer

    if not 0 < a.mass <= 1:  # before any graph is read
        raise ConnectomeError(f"--mass must be in (0, 1], got {a.mass}")
    # (category of a folder, where the graph is, how to read it): read after --out is checked
    entries: list[tuple[str | None, Path, Any]] = []
    for item in a.graphs:
        p = Path(item)
        if p.is_dir():
            from connectome.store import open_folder

            folder = open_folder(p)
            entries += [(cname, p / cname, lambda f=folder, c=cname: f[c]) for cname in folder]
        else:
            entries.append((None, p, lambda t=item: _load_graph(t)))
    _check_out_file(a.out, _graph_inputs(a.graphs))
    names, graphs, seen = [], [], set()
    for cname, where, read in entries:
        real = os.path.realpath(where)
        if real in seen:  # one graph named twice: shown once
            continue
        seen.add(real)
        g = read()
        graphs.append(g)
        names.append((cname if cname is not None else str(g.meta.get("category") or where.stem), where))
    path = write_viewer(dict(zip(_distinct_names(names), graphs)), a.out, images=a.data, mass=a.mass)
    print(f"viewer: {printable(path)}")
    return 0


def _graph_inputs(items: Sequence[str]) -> list[Path]:
    """The files a command reads its graphs from, which ``--out`` must not replace: each graph
    file, and every file directly in a folder given or named by ``DIR:CATEGORY`` (its
    index.json, .npz files, the store's metadata)."""
    out: list[Path] = []
    for item in items:
        split = _category_spec(item)
        p = Path(item if split is None else split[0])  # DIR:CATEGORY: the folder's files
        if p.is_dir():
            out += [f for f in p.iterdir() if f.is_file()]
        elif p.exists():
            out.append(p)
    return out


def _distinct_names(named: Sequence[tuple[str, Path]]) -> list[str]:
    """The names of graphs (name, file) read from several places, made distinct by their
    folders: two ``circle`` graphs from ``a/`` and ``b/`` become ``a/circle`` and ``b/circle``
    (the fewest trailing folder names that tell the folders apart); two from one folder get
    their file names, ``circle (x.npz)``. A name no other graph has stays as it is."""
    out = [n for n, _ in named]
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(out):
        groups.setdefault(n, []).append(i)
    for n, idx in groups.items():
        if len(idx) < 2:
            continue
        folders = [Path(os.path.abspath(named[i][1])).parent.parts[1:] for i in idx]
        k = 0
        while len({f[max(0, len(f) - k):] for f in folders}) < len(set(folders)):
            k += 1
        labels = ["/".join(f[max(0, len(f) - k):] + (n,)) for f in folders]
        for i, label in zip(idx, labels):
            out[i] = label if labels.count(label) == 1 else f"{label} ({named[i][1].name})"
    taken: set[str] = set()
    for i, n in enumerate(out):  # still alike (a category named "a/circle" beside them): number them
        j, name = 1, n
        while name in taken:
            j += 1
            name = f"{n} ({j})"
        taken.add(name)
        out[i] = name
    return out


def _category_spec(text: str) -> tuple[str, str] | None:
    """``(DIR, CATEGORY)`` when ``text`` is no path but ``DIR:CATEGORY`` of a folder (split at
    the first ':' before which a folder ends); else None."""
    if not Path(text).exists():
        for i, ch in enumerate(text):
            if ch == ":" and i and Path(text[:i]).is_dir():
                return text[:i], text[i + 1:]
    return None


def _load_graph(text: str) -> Any:
    """One graph: a ``.npz`` file, a GraphML or GEXF file (as Gephi or ``export`` wrote it), or
    ``DIR:CATEGORY`` of a folder written by ``extract`` (a store or an older folder of ``.npz``
    files), reading that category only."""
    from connectome.gephi import read_gexf, read_graphml
    from connectome.io import load
    from connectome.store import open_folder

    p = Path(text)
    if p.is_dir():
        names = list(open_folder(p))
        example = f"{text}:{names[0]}" if names else f"{text}:CATEGORY"
        raise ConnectomeError(f"{text!r} is a folder of {len(names)} categories; name one, e.g. {example!r}")
    split = _category_spec(text)
    if split is not None:
        folder = open_folder(split[0])
        try:
            return folder[split[1]]
        except KeyError as exc:
            raise ConnectomeError(str(exc.args[0]) if exc.args else str(exc)) from None
    readers = {".graphml": read_graphml, ".gexf": read_gexf}
    return readers.get(p.suffix.lower(), load)(p)


def _cmd_demo(a: argparse.Namespace) -> int:
    from connectome.demo import run_demo

    _check_out_dir(a.out)
    path = run_demo(a.out, progress=not a.quiet)
    print(f"report: {printable(path)}")
    return 0


def _cmd_zoo(a: argparse.Namespace) -> int:
    from connectome import zoo

    if a.action == "list":
        for name in zoo.list_models():
            info = zoo.model_info(name)
            acc = info.get("accuracy")
            acc_s = f"{acc:.3f}" if isinstance(acc, (int, float)) else "?"
            print(f"{printable(name):<14} {printable(info.get('architecture', '')):<12} held-out accuracy {acc_s}")
        return 0
    out = Path(a.out).resolve()
    package = Path(zoo.__file__).resolve().parent
    if out == package or package in out.parents:
        raise ConnectomeError(f"--out {a.out!r} is inside the installed package ({package}); "
                              "pick a folder of your own, e.g. zoo_weights")
    if out.exists() and not out.is_dir():
        raise ConnectomeError(f"--out {a.out!r} is a file; give a folder")
    if a.save_every is not None and a.save_every < 1:
        raise ConnectomeError(f"--save-every must be >= 1 step, got {a.save_every}")
    results = zoo.train_all(out, save_every=a.save_every)
    print(json.dumps(results, indent=2, default=_json_default))
    print(printable(f"wrote the weights to {out}; use them with --weights {out}/NAME.pt (e.g. zoo:smallresnet) or "
                    f"connectome.zoo.load_model(NAME, weights_dir={str(out)!r})"), file=sys.stderr)
    return 0


def _functional_parser(f: argparse.ArgumentParser, model_help: str) -> None:
    f.add_argument("model", metavar="MODEL", help=model_help)
    f.add_argument("data", metavar="DATA", help="ImageFolder directory (ROOT/<category>/<images>) or zoo:shapes[:N]")
    f.add_argument("--out", required=True, help="output .npz: the units with the between-layer correlations as edges")
    f.add_argument("--within", default=None, metavar="FILE.npz",
                   help="also write the within-layer pairs (layer/src/dst/r/p/q arrays) to this file")
    f.add_argument("--weights", default=None, help="state_dict FILE, or DEFAULT for torchvision's pretrained weights")
    f.add_argument("--method", default="pearson", choices=["pearson", "spearman", "partial"])
    f.add_argument("--layers", default=None, metavar="L,L", help="comma-separated layer names (default: all)")
    f.add_argument("--between", default="adjacent", choices=["adjacent", "all", "none"],
                   help="layer pairs tested besides each layer with itself (default adjacent)")
    f.add_argument("--fdr", default="0.05", metavar="Q|none",
                   help="false discovery rate of the kept correlations (default 0.05; none keeps every pair)")
    f.add_argument("--top-k", type=int, default=None, metavar="K", help="keep each unit's K strongest edges")
    f.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    f.add_argument("--batch-size", type=int, default=64)


def _cmd_functional(a: argparse.Namespace) -> int:
    from connectome.analysis.functional import functional_connectivity
    from connectome.extract.distributed import launched
    from connectome.modelspec import load_data_spec, load_model_spec

    if a.batch_size < 1:
        raise ConnectomeError(f"--batch-size must be >= 1, got {a.batch_size}")
    fdr: float | None = None
    if a.fdr.strip().lower() != "none":
        try:
            fdr = float(a.fdr)
        except ValueError:
            raise ConnectomeError(f"--fdr must be a number in (0, 1] or none, got {a.fdr!r}") from None
    _check_out_file(a.out)
    if a.within:
        _check_out_file(a.within)
    spec = load_model_spec(a.model, a.weights)
    data = load_data_spec(a.data, image_size=spec.input_shape[-1] if spec.input_shape else None)
    layers = [s.strip() for s in a.layers.split(",") if s.strip()] if a.layers else None
    with launched(a.device) as (rank, _):
        fc = functional_connectivity(spec.model, data, layers, a.method, between=a.between, fdr=fdr, top_k=a.top_k,
                                     device=a.device, batch_size=a.batch_size)
        if rank != 0:
            return 0
    fc.graph.with_meta(**spec.meta, model=spec.name).save(a.out)
    if a.within:
        import numpy as np

        from connectome.io import atomic_write

        names = list(fc.within)
        cols = {k: np.concatenate([fc.within[n][k] for n in names]) for k in ("src", "dst", "r", "p", "q")}
        layer = np.concatenate([np.full(fc.within[n]["r"].size, n, dtype=object) for n in names]).astype(str)
        with atomic_write(a.within, "wb") as fh:
            np.savez(fh, layer=layer, **cols)
    print(fc)
    print(f"wrote {a.out}" + (f" and {a.within}" if a.within else ""), file=sys.stderr)
    return 0


def _lesion_parser(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("data", metavar="DATA", help="ImageFolder directory or zoo:shapes[:N] (held in memory; with labels)")
    p.add_argument("--weights", default=None, help="state_dict FILE, or DEFAULT for torchvision's pretrained weights")
    p.add_argument("--order", default="strength", choices=["strength", "pagerank", "attribution"],
                   help="targeted order: most important unit first (default strength, of the weight graph)")
    p.add_argument("--random", type=int, default=5, metavar="N",
                   help="also N random orders, drawn as a band (default 5; 0: none)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fraction", type=float, default=1.0, help="largest fraction of hidden units removed (default 1)")
    p.add_argument("--scope", default="global", choices=["global", "layer"])
    p.add_argument("--target", default="label", help="label (default), predicted, or a class index/name")
    p.add_argument("--out", required=True, help="output .json with the curves and their areas")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the targeted-vs-random attack plot")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def _cmd_lesion(a: argparse.Namespace) -> int:
    from connectome.analysis.lesion import lesion_curve
    from connectome.modelspec import load_data_spec, load_model_spec

    if a.random < 0:
        raise ConnectomeError(f"--random must be >= 0 orders, got {a.random}")
    _check_out_file(a.out)
    if a.plot:
        _check_out_file(a.plot)
    spec = load_model_spec(a.model, a.weights)
    data = load_data_spec(a.data, image_size=spec.input_shape[-1] if spec.input_shape else None)
    kw = dict(steps=a.steps, fraction=a.fraction, scope=a.scope, target=a.target, device=a.device)
    curves = {f"{a.order} (targeted)": lesion_curve(spec.model, data, a.order, **kw)}
    if a.random:
        curves["random"] = lesion_curve(spec.model, data, "random", seeds=a.random, **kw)
    _write_json(a.out, {"model": spec.name, "data": a.data, "curves": {k: c.to_dict() for k, c in curves.items()}})
    if a.plot:
        from connectome.viz.connectivity import plot_attack

        _save_figure(a.plot, plot_attack(curves))
    for k, c in curves.items():
        print(f"{k}: {c!r}")
    print(f"wrote {a.out}" + (f" and {a.plot}" if a.plot else ""), file=sys.stderr)
    return 0


def _trajectory_parser(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("model", metavar="MODEL", help=model_help + " (the architecture; its weights are not used)")
    p.add_argument("checkpoints", metavar="CHECKPOINTS",
                   help="folder of state_dict files in training order (zoo train --save-every writes one)")
    p.add_argument("--data", default=None,
                   help="ImageFolder directory or zoo:shapes[:N]: attribution graphs per category (default: weights)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input (default: the model's usual size)")
    p.add_argument("--mass", type=float, default=0.8, help="circuit mass (default 0.8)")
    p.add_argument("--out", required=True, help="output .json: per step edge change, NMI, circuit Jaccard, hubs")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the layer x step heatmap")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def _cmd_trajectory(a: argparse.Namespace) -> int:
    from connectome.analysis.trajectory import trajectory
    from connectome.extract.over_training import over_training
    from connectome.modelspec import load_data_spec, load_model_spec

    _check_out_file(a.out)
    if a.plot:
        _check_out_file(a.plot)
    spec = load_model_spec(a.model, None)
    shape = _shape(a.input_shape) or spec.input_shape
    data = None
    if a.data:
        data = load_data_spec(a.data, image_size=shape[-1] if shape else None)
    elif shape is None:
        raise ConnectomeError(f"give --input-shape for {a.model!r} (for example 3,224,224)")
    graphs = over_training(spec.model, a.checkpoints, data, input_shape=shape, labels=spec.classes, device=a.device)
    traj = trajectory(graphs, mass=a.mass)
    _write_json(a.out, {"model": spec.name, "checkpoints": a.checkpoints, **traj.to_dict()})
    if a.plot:
        from connectome.viz.connectivity import plot_trajectory

        _save_figure(a.plot, plot_trajectory(traj))
    print(traj)
    print(f"wrote {a.out}" + (f" and {a.plot}" if a.plot else ""), file=sys.stderr)
    return 0


def _write_json(path: str, obj: Any) -> None:
    from connectome.io import atomic_write

    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
        fh.write("\n")


def _save_figure(path: str, fig: Any) -> None:
    from connectome.io import atomic_write
    from connectome.viz._mpl import pyplot

    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    pyplot().close(fig)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


COMMANDS = {
    "weights": _cmd_weights, "extract": _cmd_extract, "report": _cmd_report, "compare": _cmd_compare,
    "export": _cmd_export, "demo": _cmd_demo, "zoo": _cmd_zoo, "view": _cmd_view,
    "functional": _cmd_functional, "lesion": _cmd_lesion, "trajectory": _cmd_trajectory,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``connectome`` command; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores showwarning too
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except (ConnectomeError, ValueError, OSError) as exc:  # also argument mistakes; a path that is a file, a full disk
        print(f"connectome {args.command}: error: {printable(_one_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings as Python prints them, with the names they quote (skipped image files, changed
    example images) made :func:`printable`."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    try:
        (file or sys.stderr).write(printable_lines(text.rstrip("\n")) + "\n")
    except OSError:  # stderr closed: a warning is not worth a crash
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
