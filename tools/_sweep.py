"""Shared machinery of the model sweeps (``tools/sweep_timm.py``, ``tools/sweep_hf.py``).

A sweep runs one model per family through ``connectome.extract.attribution`` in float64 and
sorts the outcome into one of five results:

- ``ok``: exact: ``meta["exact"]``, completeness residual <= 1e-9 relative, and
  ``meta["target_total"]`` equal to the model's own sum of target logits (1e-12 relative); a
  model that casts its data to float32 inside (``meta["lower_precision"]``) is exact to float32
  there: its residual bound is 1e-6, and its reason says so;
- ``refused``: an ``ExtractionError`` (its first line names the construct);
- ``error``: any other exception inside extraction, a timeout or a killed process (a bug);
- ``wrong``: a graph came back but is not exact;
- ``skipped``: the model does not build here (the reason says why).

Each model runs in its own process (a model can hang or eat memory) with a timeout, forked from a
server process that made the heavy imports once (they take minutes on a loaded machine). Results go
to a JSON file, merged by family so that ``--only a,b`` reruns a few; the README's
supported-families table is generated from that file between ``<!-- sweep:NAME -->`` and
``<!-- /sweep:NAME -->``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ("ok", "refused", "error", "wrong", "skipped")
COMPLETENESS = 1e-9  # relative completeness residual an exact graph stays under
COMPLETENESS_LOWER = 1e-6  # the same where the model computes in float32 inside (meta["lower_precision"])
TARGET_RTOL = 1e-12  # target_total against the model's own logits
REASON_CHARS = 300  # a reason longer than this is cut (the first line of an error is usually shorter)
_CHILD_MARK = "SWEEP-RESULT "  # the line of a child's stdout that carries its result


# -- one model, inside the child process ------------------------------------------------------

def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, prefixed by its type unless it is an ExtractionError."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    from connectome.errors import ExtractionError

    text = msg if isinstance(exc, ExtractionError) else f"{type(exc).__name__}: {msg}"
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost traceback frame inside the connectome package."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}connectome{os.sep}" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    parts = Path(f.filename).parts
    k = len(parts) - 1 - parts[::-1].index("connectome")
    return f"{'/'.join(parts[k:])}:{f.lineno} in {f.name}"


def randomise_zero_weights(model: Any, seed: int = 0) -> Any:
    """Give all-zero Linear and Conv weights (zero-initialised heads) random values.

    A zero head makes every logit 0 and every completeness check trivially true.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and w is not None and not w.any():
                w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * 0.05)
    return model


def classify(model: Any, x: Any, y: Any, logits: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Run attribution on a float64 model and sort the outcome into ok, refused, error or wrong.

    Parameters
    ----------
    model : nn.Module
        In eval mode, float64.
    x, y : Tensor
        Images ``shape (batch, C, H, W)`` and labels ``shape (batch,)``.
    logits : callable, optional
        Turns the model's output into its logits (``lambda out: out.logits`` for Hugging Face
        models); the identity by default.

    Returns
    -------
    dict
        ``result`` (one of ``RESULTS`` but ``skipped``), ``reason`` (empty when ok), and for a
        graph ``completeness`` and ``target_total``, ``logits_total``, ``units``, ``edges``;
        ``where`` (connectome file:line) for an error.
    """
    import torch

    import connectome as cn
    from connectome.errors import ExtractionError

    try:
        g = cn.extract.attribution(model, (x, y), progress=False, device="cpu")
    except ExtractionError as exc:
        return {"result": "refused", "reason": first_line(exc)}
    except Exception as exc:  # any other exception in extraction is a bug: say where
        return {"result": "error", "reason": first_line(exc), "where": _where(exc)}
    with torch.no_grad():
        out = model(x)
        out = logits(out) if logits is not None else out
        T = out.gather(1, y[:, None]).sum().item()
    comp, total = float(g.meta["completeness_relative"]), float(g.meta["target_total"])
    info = {"completeness": comp, "target_total": total, "logits_total": T, "units": int(g.num_nodes),
            "edges": int(g.num_edges)}
    problems = []
    # a model that casts its data to float32 inside (EfficientViT's linear attention) is exact to
    # float32 there, whatever the run's type: graph meta says so, and the bound is float32's
    lower = g.meta.get("lower_precision") or []
    bound = COMPLETENESS_LOWER if lower else COMPLETENESS
    if T == 0.0:
        problems.append("the target logits sum to 0 (the check would be trivial)")
    if not g.meta["exact"] and not lower:
        problems.append("meta['exact'] is False")
    if not comp <= bound:
        problems.append(f"completeness residual {comp:.1e} > {bound:.0e}")
    if not abs(total - T) <= TARGET_RTOL * max(1.0, abs(T)):
        problems.append(f"target_total {total!r} != the model's logits {T!r}")
    note = f"exact to float32: the model casts its data to float32 inside ({lower[0]})" if lower and not problems \
        else ""
    return {"result": "wrong" if problems else "ok", "reason": "; ".join(problems) or note, **info}


def one(run_one: Callable[[str], dict[str, Any]], name: str) -> dict[str, Any]:
    """One family's result, with the seconds it took; an exception outside extraction is an error too."""
    t0 = time.perf_counter()
    try:
        res = run_one(name)
    except Exception as exc:  # outside extraction (building the inputs, the check): still a bug of the sweep or model
        res = {"result": "error", "reason": first_line(exc), "where": _where(exc)}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# -- many models, from the parent process -----------------------------------------------------

def _limit_memory(gib: float) -> None:
    """Let this process's address space grow by at most ``gib`` GiB: an allocation beyond fails (MemoryError or
    torch's "can't allocate memory") instead of pushing the shared machine into its out-of-memory killer."""
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(run_one: Callable[[str], dict[str, Any]], preload: Callable[[], None], timeout: float,
          memory: float = 6.0, describe: Callable[[str], dict[str, Any]] = lambda name: {}) -> int:
    """Answer family names read from stdin, each run in a process forked for it, with one result line each.

    The imports (torch, timm or transformers, connectome: minutes of CPU on a loaded machine)
    happen once, here, before any fork; each model still runs alone in its own process, killed
    after ``timeout`` seconds and held to ``memory`` GiB more than the server, so that a hang, a
    crash or a model that eats memory costs only its own result. ``describe(name)`` gives what is
    known of a family before its model runs (its model's name), for the result of one that dies.
    """
    import signal
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)  # before any fork: no OpenMP pool is running yet
    preload()
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = Path(f.name)
        t0 = time.perf_counter()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the model's own process
            code = 1
            try:
                if memory > 0 and sys.platform == "linux":
                    _limit_memory(memory)
                res = one(run_one, name)
                out.write_text(json.dumps(res))
                code = 0
            finally:
                os._exit(code)
        status = None
        while time.perf_counter() - t0 < timeout:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        seconds = round(time.perf_counter() - t0, 1)
        if status is None:
            res = {**describe(name), "result": "error", "reason": f"timed out after {timeout:.0f} s",
                   "seconds": seconds}
        elif out.stat().st_size:
            res = json.loads(out.read_text())
        else:
            how = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else \
                f"exit status {os.WEXITSTATUS(status)}"
            res = {**describe(name), "result": "error", "reason": f"the model's process died ({how})",
                   "seconds": seconds}
        out.unlink()
        print(_CHILD_MARK + json.dumps({"name": name, **res}), flush=True)
    return 0


def _server(script: Path, timeout: float, memory: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(script), "--serve", "--timeout", str(timeout), "--memory", str(memory)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, cwd=ROOT)


def run_all(script: Path, names: Iterable[str], jobs: int = 1, timeout: float = 600.0,
            memory: float = 6.0) -> Iterator[tuple[str, dict]]:
    """Run every family through ``jobs`` servers (``script --serve``); yield results as they finish."""
    import queue
    import threading

    todo: queue.Queue[str] = queue.Queue()
    for n in names:
        todo.put(n)
    done: queue.Queue[tuple[str, dict] | None] = queue.Queue()

    def work() -> None:
        srv = None
        try:
            while True:
                try:
                    name = todo.get_nowait()
                except queue.Empty:
                    return
                srv = srv if srv is not None and srv.poll() is None else _server(script, timeout, memory)
                srv.stdin.write(name + "\n")
                srv.stdin.flush()
                res = None
                for line in srv.stdout:
                    if line.startswith(_CHILD_MARK):
                        res = json.loads(line[len(_CHILD_MARK):])
                        res.pop("name", None)
                        break
                if res is None:  # the server itself died: a fresh one takes the next family
                    res = {"result": "error", "reason": f"the sweep server died (exit status {srv.wait()})",
                           "seconds": 0.0}
                    srv = None
                done.put((name, res))
        finally:
            if srv is not None:
                srv.stdin.close()
                srv.wait()
            done.put(None)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    running = len(threads)
    while running:
        item = done.get()
        if item is None:
            running -= 1
        else:
            yield item


def load(path: Path) -> dict[str, Any]:
    """A results file, or an empty one when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {"results": {}}


def merge(old: dict[str, Any], new: dict[str, dict], **info: Any) -> dict[str, Any]:
    """``old`` with the families of ``new`` replaced and ``info`` (versions, ...) updated; families sorted."""
    results = {**old.get("results", {}), **new}
    return {**{k: v for k, v in old.items() if k != "results"}, **info,
            "results": {k: results[k] for k in sorted(results)}}


def save(path: Path, data: dict[str, Any]) -> None:
    """Write a results file (atomically: a stopped sweep leaves the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def counts(data: dict[str, Any]) -> dict[str, int]:
    """How many families got each result."""
    out = dict.fromkeys(RESULTS, 0)
    for r in data["results"].values():
        out[r["result"]] += 1
    return out


def _cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def table(data: dict[str, Any], what: str) -> str:
    """The Markdown of a sweep's results: a counts line and one row per family.

    Parameters
    ----------
    data : dict
        A results file (``results``: family -> result; ``versions``: package -> version).
    what : str
        What a family is, in the counts line ("timm families", "Hugging Face model types").
    """
    c = counts(data)
    n = sum(c.values())
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    rest = ", ".join(f"{c[k]} {k}" for k in RESULTS[1:] if c[k])
    lines = [f"**{c['ok']} of {n} {what} extract exactly** ({rest}; {versions}).", "",
             "| family | model | image | result | reason | s |", "| --- | --- | --- | --- | --- | ---: |"]
    for fam, r in data["results"].items():
        size = r.get("input_size")
        image = f"{size[-2]}x{size[-1]}" if size else ""
        lines.append(f"| {_cell(fam)} | `{_cell(r.get('model') or '')}` | {image} | {r['result']} "
                     f"| {_cell(r.get('reason', ''))} | {r.get('seconds', '')} |")
    return "\n".join(lines)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- sweep:{name} -->", f"<!-- /sweep:{name} -->"


def section(text: str, name: str) -> str:
    """The text between a sweep's README markers (without the newlines next to them)."""
    start, end = markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"the README has no {start} ... {end} markers: add them where the table goes")
    return text[i + len(start):j].strip("\n")


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the part between a sweep's markers replaced by ``body``."""
    section(text, name)  # the markers must be there
    start, end = markers(name)
    i, j = text.find(start), text.find(end)
    return text[:i + len(start)] + "\n" + body + "\n" + text[j:]


def write_readme(path: Path, name: str, data: dict[str, Any], what: str) -> None:
    """Regenerate a sweep's table in the README from its results."""
    path = Path(path)
    path.write_text(replace_section(path.read_text(), name, table(data, what)))


def git_commit() -> str:
    """The commit the sweep runs on, with ``+dirty`` when connectome/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "connectome"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def sweep_main(argv: list[str] | None, *, doc: str, script: Path, name: str, what: str,
               families: Callable[[], list[str]], run_one: Callable[[str], dict[str, Any]],
               versions: Callable[[], dict[str, str]], default_json: Path,
               preload: Callable[[], None] = lambda: None, after: Callable[[Path], None] | None = None,
               describe: Callable[[str], dict[str, Any]] = lambda name: {}) -> int:
    """The command line shared by the sweeps: ``[--only a,b] [--jobs N] [--timeout S] [--json P] [--readme P]``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--only", help="comma-separated families to (re)run, merged into the existing --json file")
    ap.add_argument("--jobs", type=int, default=1, help="models at a time (default 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per model before it counts as an error")
    ap.add_argument("--memory", type=float, default=6.0,
                    help="GiB a model's process may allocate (0: no limit); beyond, it counts as an error")
    ap.add_argument("--json", type=Path, default=default_json, help=f"results file (default {default_json})")
    ap.add_argument("--readme", type=Path, help="regenerate this README's table from the results file")
    ap.add_argument("--no-run", action="store_true", help="only regenerate the README table")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(run_one, preload, args.timeout, args.memory, describe)
    data = load(args.json)
    if not args.no_run:
        every = families()
        names = every if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(every))
        if unknown:
            print(f"unknown families: {', '.join(unknown)}", file=sys.stderr)
            return 2
        info = {"versions": versions(), "commit": git_commit()}
        t0 = time.perf_counter()
        new: dict[str, dict] = {}
        for i, (fam, res) in enumerate(run_all(script, names, args.jobs, args.timeout, args.memory), 1):
            res["commit"] = info["commit"]
            new[fam] = res
            print(f"[{i}/{len(names)}] {fam:28s} {res.get('model', ''):40s} {res['result']:8s} {res['seconds']:7.1f} s "
                  f"{res.get('reason', '')[:150]}", flush=True)
            data = merge(data, {fam: res}, **info)
            save(args.json, data)  # after every model: a stopped sweep keeps what it measured
        c = counts(data)
        print(f"{c['ok']} of {sum(c.values())} {what} exact ({', '.join(f'{v} {k}' for k, v in c.items())}); "
              f"this run: {len(names)} in {time.perf_counter() - t0:.0f} s", flush=True)
        if after is not None:
            after(args.json.resolve())
    if args.readme:
        write_readme(args.readme, name, data, what)
    return 0
