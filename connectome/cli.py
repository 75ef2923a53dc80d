"""The ``connectome`` command.

Every subcommand imports what it needs when it runs, so ``--help`` is instant. Reports go
to stdout, progress and logs to stderr; ``--json`` prints machine-readable results. Errors
from the library print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from connectome.errors import ConnectomeError

__all__ = ["main"]

EXAMPLES = {
    "weights": "connectome weights torchvision:resnet18 --input-shape 3,224,224 --out resnet18.npz",
    "extract": "connectome extract zoo:simplecnn_a zoo:shapes --out graphs/ --per-sample",
    "report": "connectome report graphs/circle.npz --top 10 --out report/",
    "compare": "connectome compare graphs/circle.npz graphs/ring.npz --json",
    "export": "connectome export graphs/circle.npz --format graphml --prune-top-k 8 --out circle.graphml",
    "demo": "connectome demo --out demo_out",
    "zoo": "connectome zoo list",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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

    e = add("extract", "Extract one attribution graph per image category (.npz each + index.json).")
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

    r = add("report", "Analyse one graph: hubs, communities, circuit; print and write report.html.")
    r.add_argument("graph", metavar="GRAPH.npz")
    r.add_argument("--top", type=int, default=10, help="top units to list (default 10)")
    r.add_argument("--json", action="store_true", help="print machine-readable results instead of tables")
    r.add_argument("--out", default=None, help="directory for report.html and PNGs")
    r.add_argument("--seed", type=int, default=0)

    c = add("compare", "Compare two graphs of one model: shared and analogous units and circuits.")
    c.add_argument("a", metavar="A.npz")
    c.add_argument("b", metavar="B.npz")
    c.add_argument("--top", type=int, default=20)
    c.add_argument("--json", action="store_true")
    c.add_argument("--out", default=None, help="directory for report.html and PNGs")

    x = add("export", "Export a graph to GraphML or GEXF for Gephi.")
    x.add_argument("graph", metavar="GRAPH.npz")
    x.add_argument("--format", required=True, choices=["graphml", "gexf"])
    x.add_argument("--prune-top-k", type=int, default=None, help="keep the K strongest inputs per unit")
    x.add_argument("--out", required=True, help="output file")

    d = add("demo", "Run the whole toolkit on the embedded zoo and write a report.")
    d.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    d.add_argument("--quiet", action="store_true")

    z = add("zoo", "List or retrain the embedded zoo models.")
    z.add_argument("action", choices=["list", "train"])
    z.add_argument("--out", default=None, help="train: directory for the weights (default: the package's)")
    return p


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
    _check_out_file(a.out)
    g = extract.weights(spec.model, shape, reduce=a.reduce, labels=spec.classes, name=spec.name)
    g.save(a.out)
    print(g)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


def _check_out_file(path: str) -> None:
    parent = Path(path).parent
    if str(parent) and not parent.is_dir():
        raise ConnectomeError(f"cannot write {path!r}: folder {str(parent)!r} does not exist")


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
    from connectome.extract import attribution_by_category
    from connectome.extract.distributed import agree
    from connectome.modelspec import load_data_spec, load_model_spec
    from connectome.reporting import printable

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

    spec = load_model_spec(a.model, a.weights)
    size = a.image_size or (spec.input_shape[-1] if spec.input_shape else None)
    data = load_data_spec(a.data, image_size=size)
    transform = None
    if isinstance(data, str) and size is not None:
        from connectome.extract.data import default_transform

        transform = default_transform(size)
    cats = [c.strip() for c in a.categories.split(",")] if a.categories else None
    target: Any = a.target
    out = Path(a.out)
    index: dict[str, Any] = {"model": spec.name, "data": a.data, "target": a.target, "complete": False, "categories": {}}
    # Hours of work must not end in a folder that cannot be written: write the (partial) index
    # first. Every process takes part in agree(), so none waits for a failed rank 0.
    error: BaseException | None = None
    if rank == 0:
        try:
            _write_index(out, index, a.out)
        except BaseException as exc:  # noqa: BLE001 - re-raised by agree()
            error = exc
    agree(error)
    graphs = attribution_by_category(
        spec.model, data, target, categories=cats, batch_size=a.batch_size, transform=transform,
        progress=not a.quiet, per_sample=a.per_sample, device=a.device, max_images=a.max_images, precision=a.precision,
        name=spec.name, labels=spec.classes, num_workers=a.num_workers, checkpoint=a.checkpoint,
        checkpoint_every=a.checkpoint_every,
    )
    if rank != 0:
        return 0
    files = category_files(list(graphs))
    for cname, g in graphs.items():
        g.save(out / files[cname])
        index["categories"][cname] = {
            "file": files[cname], "n_images": g.meta["n_images"],
            "completeness_residual": g.meta["completeness_residual"],
        }
        _write_index(out, index, a.out)  # a run stopped here (full disk) lists what it wrote, as partial
        print(f"{printable(cname):>20}: {g.meta['n_images']:5d} images  {g.num_nodes} units  {g.num_edges} edges  "
              f"completeness residual {g.meta['completeness_residual']:.2e}")
    index["complete"] = True
    _write_index(out, index, a.out)
    print(f"wrote {len(graphs)} graphs and index.json to {printable(str(out))}", file=sys.stderr)
    return 0


def _write_index(out: Path, index: dict[str, Any], given: str) -> None:
    from connectome.io import atomic_write

    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "index.json", "w") as fh:
            json.dump(index, fh, indent=2)
    except OSError as exc:
        raise ConnectomeError(f"cannot write to --out {given!r} ({exc.strerror or exc}); "
                              "choose a folder you can write to") from None


def category_files(names: Sequence[str]) -> dict[str, str]:
    """One distinct ``.npz`` file name per category, stable from run to run.

    A category whose name is a safe, short file name keeps it (``circle.npz``); any other
    gets its safe characters, cut to a bounded length, and a hash of the full name
    (``a_b-c8687a08aa.npz``). Names that only a case-insensitive file system would merge
    (``Cat``, ``cat``) both get the hash.
    """
    from connectome.io import file_stem

    stems = {n: file_stem(n) for n in names}
    by_folded: dict[str, list[str]] = {}
    for n, stem in stems.items():
        by_folded.setdefault(stem.casefold(), []).append(n)
    for group in by_folded.values():
        if len(group) > 1:
            for n in group:
                stems[n] = file_stem(n, hashed=True)
    if len({s.casefold() for s in stems.values()}) != len(stems):
        raise ConnectomeError("two category names map to one file name even with their hashes; rename one category")
    return {n: f"{s}.npz" for n, s in stems.items()}


def _cmd_report(a: argparse.Namespace) -> int:
    from connectome.io import load
    from connectome.reporting import graph_report

    _check_out_dir(a.out)
    g = load(a.graph)
    return _emit(graph_report(g, top=a.top, out=a.out, seed=a.seed), a.json)


def _emit(result: Any, as_json: bool) -> int:
    """Print a report: tables for people, or JSON for machines; the HTML path to stderr."""
    if as_json:
        print(json.dumps(result.data, indent=2, default=_json_default))
    else:
        print(result.text)
    if result.path:
        print(f"report: {result.path}", file=sys.stderr)
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from connectome.io import load
    from connectome.reporting import compare_report

    _check_out_dir(a.out)
    ga, gb = load(a.a), load(a.b)
    return _emit(compare_report(ga, gb, top=a.top, out=a.out), a.json)


def _cmd_export(a: argparse.Namespace) -> int:
    from connectome import io

    g = io.load(a.graph)
    if a.prune_top_k is not None:
        if a.prune_top_k < 1:
            raise ConnectomeError(f"--prune-top-k must be >= 1, got {a.prune_top_k}")
        g = g.prune(top_k=a.prune_top_k)
    (io.write_graphml if a.format == "graphml" else io.write_gexf)(g, a.out)
    print(f"wrote {a.out} ({g.num_nodes} nodes, {g.num_edges} edges)", file=sys.stderr)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from connectome.demo import run_demo

    _check_out_dir(a.out)
    path = run_demo(a.out, progress=not a.quiet)
    print(f"report: {path}")
    return 0


def _cmd_zoo(a: argparse.Namespace) -> int:
    from connectome import zoo

    if a.action == "list":
        for name in zoo.list_models():
            info = zoo.model_info(name)
            acc = info.get("accuracy")
            acc_s = f"{acc:.3f}" if isinstance(acc, (int, float)) else "?"
            print(f"{name:<14} {info.get('architecture', ''):<12} held-out accuracy {acc_s}")
        return 0
    results = zoo.train_all(a.out)
    print(json.dumps(results, indent=2, default=_json_default))
    return 0


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
    "export": _cmd_export, "demo": _cmd_demo, "zoo": _cmd_zoo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``connectome`` command; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return COMMANDS[args.command](args)
    except ConnectomeError as exc:
        print(f"connectome {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # argument mistakes; a path that is a file, a full disk
        print(f"connectome {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
