#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one script (a GPU machine is lent only now and then, for a
# few minutes): CUDA training with bf16 autocast on the real Criteo sample, deterministic CUDA reruns,
# batch prediction, component parallelism on NCCL (torchrun, one rank), the GPU training benchmark, and a
# full-size run of the product's training loop.
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh        # exit 1 if any check failed or missed its target
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_checks.sh   # self-check of the script on a machine without a GPU
#   CHECKS="amp scale" bash benchmarks/gpu_checks.sh   # only these groups (a second, shorter lease)
#
# Groups (CHECKS, default all): train (bf16 training of the demo config), deterministic, parallel
# (torchrun on NCCL), amp (bf16 against fp32 AUC), bench (bench_train.py --check), scale (end-to-end
# `ctr-ad train` from Parquet on SCALE_ROWS rows, default 20M, stream and memory loaders, target
# >= 1 M ex/s at K = 4).
#
# Every check runs even after one fails (a lease is short: one run should report everything); the
# summary at the end names the failed ones and the script then exits 1.
# Python packages the GPU image lacks travel either as wheels in .whl/ or, when the wheels are too big to
# travel (polars' runtime alone is 54 MB), as one xz tarball of them installed: .gpusite/site.tar.xz
# (34 MB; how to build it: benchmarks/README.md, "GPU").
# The whole output is also kept in $OUT/gpu-checks.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-checks.log") 2>&1
WORK=$(mktemp -d)
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu QUICK=1 checks the script itself on a machine without a GPU
QUICK=${QUICK:-0}
LONG_STEP_LIMIT=${LONG_STEP_LIMIT:-240}   # seconds for each scale step, so that the summary always prints
CHECKS=${CHECKS:-train deterministic parallel amp bench scale}
SCALE_ROWS=${SCALE_ROWS:-20000000}
want() { [[ " $CHECKS " == *" $1 "* ]]; }
if [ -f .gpusite/site.tar.xz ] && [ -z "${NO_WHEELS:-}" ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpusite/site.tar.xz || exit 1
  export PYTHONPATH=/tmp/site:$PWD
elif [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# The repository is imported, not installed: build the ingest's compiled loops the way the install
# would, when there is a compiler (without them ingest takes its slower polars path, same dataset).
KERNELS="ctr_ad/_kernels$($PY -c 'import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])')"
if [ ! -f "$KERNELS" ] && command -v gcc >/dev/null 2>&1; then
  gcc -O3 -shared -fPIC -o "$KERNELS" ctr_ad/_kernels.c || echo "could not compile $KERNELS: polars path"
fi
echo "compiled ingest kernels: $($PY -c 'from ctr_ad import native; print(native.available())')"
CTR="$PY -m ctr_ad.cli"
step() { echo; echo "=== $* ($(date +%T))"; }
FAILED=()
check() {  # check NAME COMMAND...: run it; record NAME when it exits non-zero
  local name=$1
  shift
  "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "CHECK FAILED: $name (exit $rc)"
    FAILED+=("$name")
  fi
}
tee_to() {  # tee_to FILE COMMAND...: run it, copying stdout to FILE; the command's exit status is kept
  local file=$1
  shift
  "$@" | tee "$file"
}
stderr_to() {  # stderr_to FILE COMMAND...: run it, keeping its stderr in FILE (and showing it); status kept
  local file=$1
  shift
  "$@" 2>"$file"
  local rc=$?
  cat "$file" >&2
  return $rc
}
finish() {
  step "summary"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED (${#FAILED[@]}): ${FAILED[*]}"
    exit 1
  fi
  echo "all checks passed"
  exit 0
}

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
check environment $PY -c "import torch, polars; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'polars', polars.__version__)"

step "ingest the real Criteo 8k sample"
D=data/criteo-kaggle-8k
check ingest $CTR ingest --source criteo --split files --input $D/train.tsv $D/dev.tsv $D/test.tsv \
  --out "$WORK/c8k" --quiet

if want train; then
  step "CUDA training, bf16 autocast (demo config)"
  check train-demo tee_to "$OUT/train-$DEVICE-demo.json" $CTR train --data "$WORK/c8k" --config pipelines/configs/demo.yaml \
    --out "$WORK/run-cuda" --device $DEVICE --no-progress
  cp "$WORK/run-cuda/metrics.jsonl" "$OUT/train-$DEVICE-demo-metrics.jsonl" 2>/dev/null
fi

if want deterministic; then
  step "deterministic CUDA: two runs must give bit-identical predictions"
  for r in a b; do
    check "deterministic-train-$r" $CTR train --data "$WORK/c8k" --config pipelines/configs/demo.yaml \
      --out "$WORK/det-$r" --device $DEVICE --deterministic --no-progress --set train.epochs=2
    check "deterministic-predict-$r" $CTR predict --bundle "$WORK/det-$r" --source criteo --input $D/test.tsv \
      --out "$WORK/det-$r.parquet"
  done
  check deterministic-identical $PY - "$WORK" <<'EOF2'
import sys, polars as pl
w = sys.argv[1]
a, b = (pl.read_parquet(f"{w}/det-{r}.parquet") for r in "ab")
same = a.equals(b)
print("deterministic CUDA predictions identical:", same, "rows", a.height)
sys.exit(0 if same else 1)
EOF2
fi

if want parallel; then
  step "component parallelism under torchrun --nproc_per_node 1 (NCCL on CUDA): equal to one plain process"
  # One rank owns all K = 4 components, so the run must match a plain process bit for bit in deterministic
  # mode while going through the component-parallel path: the process group, the all-gather of the
  # penalty's logits, the loss all-reduce, gathered evaluation, checkpoint and bundle.
  BACKEND=$([ "$DEVICE" = cuda ] && echo nccl || echo gloo)
  CP_SETS=(--set train.epochs=2 --set anti_distillation.penalty=negative_correlation --set model.components=4)
  check component-parallel-plain $CTR train --data "$WORK/c8k" --config pipelines/configs/demo.yaml \
    --out "$WORK/cp-plain" --device $DEVICE --deterministic --no-progress "${CP_SETS[@]}"
  check component-parallel-torchrun stderr_to "$OUT/component-parallel-$DEVICE.log" $PY -m torch.distributed.run \
    --standalone --nproc_per_node 1 -m ctr_ad.cli train --data "$WORK/c8k" --config pipelines/configs/demo.yaml \
    --out "$WORK/cp-1" --device $DEVICE --deterministic --no-progress "${CP_SETS[@]}" \
    --set train.parallelism=component
  check component-parallel-backend grep -q "rank 0 owns components 0..3 (backend $BACKEND)" "$OUT/component-parallel-$DEVICE.log"
  check component-parallel-equal $PY - "$WORK" <<'EOF2'
import sys
from safetensors.torch import load_file
w = sys.argv[1]
a, b = (load_file(f"{w}/{r}/bundle/model.safetensors") for r in ("cp-plain", "cp-1"))
diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")
print("component-parallel (1 rank) vs plain process, max |weight difference|:", diff)
sys.exit(0 if diff <= 1e-5 else 1)
EOF2
fi

if want amp; then
  step "bf16 autocast against fp32: same seeds, test AUC within 0.001"
  # Deterministic kernels on both sides, so the only difference left is the arithmetic's precision.
  for prec in bf16 fp32; do
    check "amp-train-$prec" tee_to "$WORK/amp-$prec.json" $CTR train --data "$WORK/c8k" \
      --config pipelines/configs/demo.yaml --out "$WORK/amp-$prec" --device $DEVICE --deterministic --no-progress \
      --set train.amp=$([ $prec = bf16 ] && echo true || echo false)
  done
  check amp-auc $PY - "$WORK" <<'EOF2'
import json, sys
w = sys.argv[1]
bf16, fp32 = (json.loads(open(f"{w}/amp-{p}.json").read().strip().splitlines()[-1]) for p in ("bf16", "fp32"))
diff = abs(bf16["test"]["auc"] - fp32["test"]["auc"])
print(f"test AUC bf16 {bf16['test']['auc']:.5f} fp32 {fp32['test']['auc']:.5f} |difference| {diff:.5f} (target <= 0.001)")
sys.exit(0 if diff <= 0.001 else 1)
EOF2
fi

if want bench; then
  step "GPU training benchmark (data resident on the GPU)"
  # --check: exit 1 when a target (K = 4: >= 1 M ex/s at batch 4096, >= 1.5 x deepctr-torch x 4 at both
  # batches, >= 2 x the loop of K models at batch 512) is missed or its row is flagged impossible. The
  # quick run has no K = 4 row: it only checks that the benchmark runs.
  if [ "$QUICK" = 1 ]; then
    check bench-train $PY benchmarks/bench_train.py --device $DEVICE --quick --check \
      --out "$OUT/train-$DEVICE-quick.json"
  else
    check bench-train timeout $LONG_STEP_LIMIT $PY benchmarks/bench_train.py --device $DEVICE --ks 1 4 8 \
      --batches 4096 512 --check --out "$OUT/train-$DEVICE.json"
  fi
fi

if want scale; then
  rows=$([ "$QUICK" = 1 ] && echo 200000 || echo "$SCALE_ROWS")
  step "end to end at scale: ctr-ad train from Parquet on $rows synthetic rows, criteo config (K = 4, batch 4096)"
  # One synth process: parts with different seeds would plant different click models, parts with one
  # seed would repeat rows across the splits.
  check scale-synth $CTR synth --rows "$rows" --seed 11 --out "$WORK/scale.tsv"
  check scale-ingest $CTR ingest --source synthetic --input "$WORK/scale.tsv" --out "$WORK/scale" \
    --workers "$(nproc)" --quiet
  rm -f "$WORK/scale.tsv"
  for loader in stream memory; do
    check "scale-train-$loader" tee_to "$OUT/train-$DEVICE-scale-$loader.json" timeout $LONG_STEP_LIMIT $CTR train \
      --data "$WORK/scale" --config pipelines/configs/criteo.yaml --out "$WORK/run-$loader" --device $DEVICE \
      --no-progress --set train.epochs=1 --set data.loader=$loader
    cp "$WORK/run-$loader/metrics.jsonl" "$OUT/train-$DEVICE-scale-$loader-metrics.jsonl" 2>/dev/null
  done
  # examples/s of each loader over its evaluation windows (an eval's own time included); the target
  # applies to the best loader and only to a full-size run on a GPU.
  target=$([ "$DEVICE" = cuda ] && [ "$QUICK" != 1 ] && echo 1000000 || echo 0)
  check scale-throughput $PY - "$OUT" "$DEVICE" "$target" <<'EOF2'
import json, pathlib, sys
out, device, target = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
best = 0.0
for loader in ("stream", "memory"):
    path = out / f"train-{device}-scale-{loader}-metrics.jsonl"
    if not path.exists():
        print(f"{loader}: no metrics (the run failed or ran out of time)")
        continue
    rates = [json.loads(line)["examples_per_s"] for line in path.read_text().splitlines()]
    print(f"{loader} loader: examples/s per evaluation window {[round(r) for r in rates]}")
    best = max(best, max(rates))
print(f"best end-to-end {best:,.0f} ex/s (target >= {target:,.0f})")
sys.exit(0 if best >= target else 1)
EOF2
fi
finish
