"""Scaling of attribution extraction across processes (torch.distributed), against 1 process.

resnet18 (random weights, 10 classes) at 112x112 on random images held in memory (no
decoding: this measures the compute and the final all_reduce, not data loading):

- 1 process, 1 thread: the baseline;
- k processes (gloo, started with torch.multiprocessing.spawn), 1 thread each: the way
  ``torchrun --nproc-per-node k`` splits a run;
- 1 process with k threads, for comparison (intra-op threads instead of processes);
- 1 CUDA GPU when present.

Scaling efficiency = throughput with k / (k x throughput with 1). On a machine shared with
other work the wall clock says little, so the CPU time per image is reported too: its ratio
(1 process / k processes) is the efficiency k idle cores would give. Also the time of the one
all_reduce at the end, for the size of resnet18's accumulators. Each configuration is timed
``--repeats`` times after a warm-up run (best kept): timings on a shared machine are noisy.

Usage: python benchmarks/bench_scale.py [--images N] [--batch N] [--size PX] [--procs 2] [--repeats 2]
Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(size: int, n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _worker(rank: int, world: int, threads: int, port: int, cfg: dict, out: str) -> None:
    from connectome.extract.flow import attribution

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dev = torch.device(cfg["device"])
        model, x, y = _setup(cfg["size"], cfg["images"])
        kw = dict(batch_size=cfg["batch"], device=dev, progress=False)
        attribution(model, (x[: 2 * world], y[: 2 * world]), **kw)  # warm-up: trace, allocator, gloo
        times, cpu = [], []
        for _ in range(cfg["repeats"]):
            if world > 1:
                dist.barrier()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            g = attribution(model, (x, y), **kw)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            c = torch.tensor([time.process_time() - c0], dtype=torch.float64)
            if world > 1:  # CPU seconds of all processes together
                dist.all_reduce(c)
            cpu.append(float(c))
        reduce_s = None
        n_numbers = int(g.num_edges * (2 if g.meta.get("per_sample") else 1) + 6 * g.num_nodes)
        if world > 1:  # the one all_reduce at the end, alone, at the size of the accumulators
            buf = torch.zeros(n_numbers, dtype=torch.float64)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            reduce_s = time.perf_counter() - t0
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": min(times), "all_seconds": times, "cpu_seconds": min(cpu),
                                             "n_images": g.meta["n_images"], "reduce_seconds": reduce_s,
                                             "reduced_numbers": n_numbers}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, threads: int, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        if world == 1:
            _worker(0, 1, threads, 0, cfg, out)
        else:
            mp.spawn(_worker, args=(world, threads, _free_port(), cfg, out), nprocs=world, join=True)
        r = json.loads(Path(out).read_text())
    r["images_per_s"] = r["n_images"] / r["seconds"]
    r["cpu_ms_per_image"] = 1e3 * r["cpu_seconds"] / r["n_images"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--procs", type=int, default=2, help="largest number of CPU processes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    a = ap.parse_args()
    cfg = {"images": a.images, "batch": a.batch, "size": a.size, "repeats": a.repeats, "device": "cpu"}
    rows = []
    base = measure(1, 1, cfg)
    rows.append({"config": "cpu, 1 process x 1 thread", "k": 1, **base, "efficiency": 1.0})
    for k in range(2, a.procs + 1):
        r = measure(k, 1, cfg)
        rows.append({"config": f"cpu, {k} processes x 1 thread (gloo)", "k": k, **r,
                     "efficiency": r["images_per_s"] / (k * base["images_per_s"])})
        r = measure(1, k, cfg)
        rows.append({"config": f"cpu, 1 process x {k} threads", "k": k, **r,
                     "efficiency": r["images_per_s"] / (k * base["images_per_s"])})
    if torch.cuda.is_available():
        gcfg = {**cfg, "device": "cuda", "images": max(a.images, 2048), "batch": 64}
        r = measure(1, 1, gcfg)
        rows.append({"config": f"cuda, 1 GPU ({torch.cuda.get_device_name()})", "k": 1, **r, "efficiency": None})

    print(f"resnet18 at {a.size}x{a.size}, batch {a.batch}, {a.images} images in memory, "
          f"{os.cpu_count()} CPU cores (shared)")
    for r in rows:
        r["cpu_efficiency"] = None if r["efficiency"] is None else base["cpu_ms_per_image"] / r["cpu_ms_per_image"]
    print(f"{'configuration':<38} {'images/s':>9} {'seconds':>8} {'efficiency':>10} {'CPU ms/img':>10} {'CPU eff.':>8}")
    for r in rows:
        eff = "" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        ceff = "" if r["cpu_efficiency"] is None else f"{r['cpu_efficiency']:.2f}"
        print(f"{r['config']:<38} {r['images_per_s']:9.1f} {r['seconds']:8.2f} {eff:>10} "
              f"{r['cpu_ms_per_image']:10.1f} {ceff:>8}")
    print("efficiency = images/s with k / (k x images/s with 1); CPU eff. = CPU time per image with 1 / with k "
          "(what the efficiency would be on k idle cores)")
    red = [r for r in rows if r.get("reduce_seconds") is not None]
    if red:
        print(f"final all_reduce of {red[0]['reduced_numbers']:,} float64 numbers (gloo): "
              f"{1e3 * red[0]['reduce_seconds']:.1f} ms")
    result = {
        "model": "resnet18", "image_size": a.size, "batch_size": a.batch, "images": a.images,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
