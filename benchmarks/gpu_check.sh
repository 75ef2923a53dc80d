#!/usr/bin/env bash
# Every GPU measurement of issue 11 in one run (about 8 minutes on one H100/H200):
#   1. the gpu-marked tests of the extraction (pytest -m gpu tests/extract);
#   2. the public API end to end against a plain forward+backward loop over the same batches
#      (benchmarks/bench_extract.py --only e2e): resnet50 and resnet18, batch 128, 1536 images
#      from pinned CPU tensors: exact float32 (TF32 off) vs plain float32 with TF32 off, tf32 and
#      bf16 vs the plain pass at the same precision, per_sample; and from CUDA tensors (exact);
#   3. completeness residuals and flow errors under each precision, against float64 flows;
#   4. a torch.profiler table of one ResNet-50 attribution step and of one plain step;
#   5. modern convnets and transformers (efficientnet_b0, convnext_tiny, regnet_y_1_6gf, vit_b_16,
#      swin_t) end to end as in 2, batch 64, 512 images, exact float32;
#   6. host overhead: the time of a step on the host and on the device, tiny and at batch 128;
#   7. ATen ops per batch, attribution against a training step, on the GPU path and the CPU path
#      (benchmarks/bench_ops.py, counted on the CPU: the count is the same on any device).
# Extraction only: nothing here imports igraph or leidenalg.
#
# Usage (from the repository root):  PYTHONPATH=. bash benchmarks/gpu_check.sh
# Environment: OUT (output folder, default ./gpu_out), PYTHON (default python),
#   GPU_CHECK_SMALL=1 (tiny sizes, runs on the CPU: to try the script without a GPU),
#   GPU_CHECK_IMAGES (default 1536), GPU_CHECK_REPEATS (default 2).
# Everything goes to $OUT: one .log per part, extract_e2e.json, precision.json,
# profile_*.txt, env.txt, and summary.txt (also printed at the end).

set -u -o pipefail
OUT="${OUT:-./gpu_out}"
PY="${PYTHON:-python}"
SMALL="${GPU_CHECK_SMALL:-0}"
export PYTHONPATH="${PYTHONPATH:-.}"
export OUT SMALL
mkdir -p "$OUT"
T0=$(date +%s)
FAILED=()

if [ "$SMALL" = "1" ]; then
    DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    E2E=(--models resnet18 --batch 4 --images 8 --size 64 --per-sample-images 4 --repeats 1)
    RULES=(--models mobilenet_v3_small,vit_b_16 --batch 2 --images 4 --repeats 1)
    LIMITS=(120 300 120 120 200)
else
    DEVICE=cuda
    IMAGES="${GPU_CHECK_IMAGES:-1536}"
    E2E=(--models resnet50,resnet18 --batch 128 --images "$IMAGES" --per-sample-images 512
         --repeats "${GPU_CHECK_REPEATS:-2}")
    RULES=(--models efficientnet_b0,convnext_tiny,regnet_y_1_6gf,vit_b_16,swin_t --batch 64 --images 512 --repeats 1)
    LIMITS=(90 250 50 40 150)
fi
export DEVICE

# part NAME LIMIT_S CMD...: runs CMD with a time limit, output to $OUT/NAME.log, tail shown
part() {
    local name=$1 limit=$2
    shift 2
    local start=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $(( $(date +%s) - start ))s"
    tail -n 25 "$OUT/$name.log" | sed 's/^/   /'
    [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
}

{
    date -u
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'threads', torch.get_num_threads())"
} > "$OUT/env.txt" 2>&1
echo "device: $DEVICE   small: $SMALL   out: $OUT"
tail -n 1 "$OUT/env.txt"

# 1. gpu-marked tests (they skip without CUDA)
part tests_gpu "${LIMITS[0]}" $PY -m pytest -q -p no:cacheprovider -m gpu tests/extract -rs

# 2. end to end
part e2e "${LIMITS[1]}" $PY benchmarks/bench_extract.py --only e2e --device "$DEVICE" "${E2E[@]}" \
    --precisions exact,tf32,bf16 --per-sample --source pinned,device --out "$OUT/extract_e2e.json"

# 3. precision: completeness residuals and flow errors against float64
part precision "${LIMITS[2]}" $PY - <<'EOF'
import copy, json, os, time
import numpy as np, torch, torchvision
import connectome as cn

dev, small = torch.device(os.environ["DEVICE"]), os.environ["SMALL"] == "1"
n, batch, size = (8, 4, 64) if small else (128, 64, 224)
rows = []
for name in (["resnet18"] if small else ["resnet18", "resnet50"]):
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(weights=None).eval().to(dev)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 1000, (n,), generator=gen)
    t0 = time.perf_counter()
    ref = cn.extract.attribution(copy.deepcopy(m).double(), (x.double(), y), batch_size=batch, device=dev, progress=False)
    print(f"{name}: float64 reference in {time.perf_counter() - t0:.1f}s, completeness {ref.meta['completeness_relative']:.1e}", flush=True)
    scale = np.abs(ref.weight).max()
    for precision in ("exact", "tf32", "bf16"):
        t0 = time.perf_counter()
        g = cn.extract.attribution(m, (x, y), batch_size=batch, device=dev, precision=precision, progress=False)
        d = g.weight - ref.weight
        row = {"model": name, "device": str(dev), "images": n, "precision": precision, "exact": g.meta["exact"],
               "expected_error": g.meta["expected_error"], "seconds": time.perf_counter() - t0,
               "completeness_relative": g.meta["completeness_relative"],
               "max_edge_error_over_max_edge": float(np.abs(d).max() / scale),
               "relative_l2_edge_error": float(np.linalg.norm(d) / np.linalg.norm(ref.weight))}
        rows.append(row)
        print(f"  {precision:<5} exact={row['exact']!s:<5} completeness {row['completeness_relative']:.1e}  "
              f"edge error max {row['max_edge_error_over_max_edge']:.1e} (of the largest edge), "
              f"L2 {row['relative_l2_edge_error']:.1e}  stated {row['expected_error']:.1e}", flush=True)
json.dump({"gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None, "torch": torch.__version__,
           "rows": rows}, open(os.path.join(os.environ["OUT"], "precision.json"), "w"), indent=2)
EOF

# 4. profile of one ResNet-50 step (attribution and plain)
part profile "${LIMITS[3]}" $PY - <<'EOF'
import os
import torch, torchvision
from torch.profiler import ProfilerActivity, profile
from connectome.extract._model import eval_mode, no_inplace, precision_mode
from connectome.extract.flow import FlowAccumulator
from connectome.extract.trace import trace_units

dev, small = torch.device(os.environ["DEVICE"]), os.environ["SMALL"] == "1"
name, batch, size = ("resnet18", 4, 64) if small else ("resnet50", 128, 224)
torch.manual_seed(0)
m = getattr(torchvision.models, name)(weights=None).eval().to(dev)
x, y = torch.randn(batch, 3, size, size, device=dev), torch.randint(0, 1000, (batch,), device=dev)
target = lambda logits: logits.gather(1, y[:, None]).squeeze(1)

def plain():
    m.zero_grad(set_to_none=True)
    m(x.clone().requires_grad_(True)).gather(1, y[:, None]).sum().backward()

activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
with eval_mode(m), no_inplace(m), precision_mode("exact"):
    acc = FlowAccumulator(trace_units(m, x[:1]), dev, torch.float32)
    for label, fn in (("attribution_step", lambda: acc.step(x, target)), ("plain_step", plain)):
        for _ in range(2):
            fn()  # warm-up (cudnn autotune)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=40)
        except (KeyError, AttributeError, RuntimeError):
            table = prof.key_averages().table(sort_by=sort.replace("cuda", "device"), row_limit=40)
        path = os.path.join(os.environ["OUT"], f"profile_{name}_{label}.txt")
        open(path, "w").write(f"{name} batch {batch} {size}x{size} on {dev} (exact float32), sorted by {sort}\n{table}\n")
        print(f"wrote {path}")
        print("\n".join(table.splitlines()[:14]))
EOF

# 5. modern convnets and transformers on the device (the linearisation rules): exact float32,
#    the public API end to end against a training step over the same batches (the same split
#    into steps, data+setup and graph as part 2, so fixed costs are not mistaken for steps)
part rules "${LIMITS[4]}" $PY benchmarks/bench_extract.py --only e2e --device "$DEVICE" "${RULES[@]}" \
    --precisions exact --out "$OUT/rules_e2e.json"

# 6. host overhead: a step on one 32x32 image, where the device does almost nothing, against a
#    training step; and at batch 128 (224x224, tf32) the host's and the device's time per step,
#    to tell a host-bound step (it waits on launching kernels) from a device-bound one
part overhead 60 $PY - <<'EOF'
import os, time
import torch, torchvision
from connectome.extract._model import precision_mode
from connectome.extract.accumulator import FlowAccumulator
from connectome.extract.trace import trace_units

dev, small = torch.device(os.environ["DEVICE"]), os.environ["SMALL"] == "1"
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
for name in ["resnet18"] if small else ["resnet50", "resnet18"]:
    m = torchvision.models.get_model(name).eval().to(dev)
    for n, size, precision in [(1, 32, "exact")] + ([] if small else [(128, 224, "tf32")]):
        x = torch.randn(n, 3, size, size, device=dev)
        y = torch.randint(0, 1000, (n,), device=dev)
        fn = lambda l: l.gather(1, y[:, None])[:, 0]  # noqa: E731
        with precision_mode(precision):
            acc = FlowAccumulator(trace_units(m, x[:1]), dev, torch.float32)

            def plain():
                m.zero_grad(set_to_none=True)
                m(x.clone().requires_grad_(True)).gather(1, y[:, None]).sum().backward()

            def host_and_total(f):
                f()
                sync()
                best_total, best_host = 1e9, 1e9
                for _ in range(5):
                    t0 = time.perf_counter()
                    f()
                    t1 = time.perf_counter()
                    sync()
                    t2 = time.perf_counter()
                    best_host, best_total = min(best_host, t1 - t0), min(best_total, t2 - t0)
                return best_host, best_total

            hp, tp = host_and_total(plain)
            ha, ta = host_and_total(lambda: acc.step(x, fn))
        print(f"{name} batch {n} {size}x{size} {precision}: step {ta*1e3:.1f} ms (host {ha*1e3:.1f}) vs training step "
              f"{tp*1e3:.1f} ms (host {hp*1e3:.1f}): x{ta/tp:.2f}", flush=True)
EOF

# 7. ops dispatched per batch (issue 26): the four torchvision models and two timm ones (when
#    timm is installed), on the GPU path (per-unit sums joined) and the CPU path
if [ "$SMALL" = "1" ]; then OPS=(--models resnet18 --timm ""); else OPS=(); fi
part ops 240 $PY benchmarks/bench_ops.py "${OPS[@]}" --out "$OUT/ops.json"

{
    echo "gpu_check: device $DEVICE, small=$SMALL, $(( $(date +%s) - T0 ))s in all; failed parts: ${FAILED[*]:-none}"
    grep -h "passed\|failed\|skipped\|error" "$OUT/tests_gpu.log" | tail -n 3
    grep -h "plain .* API " "$OUT/e2e.log"
    grep -h "completeness\|reference" "$OUT/precision.log"
    grep -h " x[0-9]" "$OUT/rules.log"
    grep -h "training step" "$OUT/overhead.log"
    grep -h "x " "$OUT/ops.log"
} > "$OUT/summary.txt"
echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
[ ${#FAILED[@]} -eq 0 ]
