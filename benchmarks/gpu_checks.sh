#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one script (a GPU machine is lent only now and then, for a
# few minutes): CUDA training with bf16 autocast on the real Criteo sample, deterministic CUDA reruns,
# batch prediction, component parallelism on NCCL (torchrun, one rank), the GPU training benchmark, and a
# full-size run of the product's training loop.
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh        # exit 1 if any check failed or missed its target
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_checks.sh   # self-check of the script on a machine without a GPU
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

step "CUDA training, bf16 autocast (demo config)"
check train-demo tee_to "$OUT/train-$DEVICE-demo.json" $CTR train --data "$WORK/c8k" --config pipelines/configs/demo.yaml --out "$WORK/run-cuda" \
  --device $DEVICE --no-progress
cp "$WORK/run-cuda/metrics.jsonl" "$OUT/train-$DEVICE-demo-metrics.jsonl" 2>/dev/null

step "deterministic CUDA: two runs must give bit-identical predictions"
for r in a b; do
  check "deterministic-train-$r" $CTR train --data "$WORK/c8k" --config pipelines/configs/demo.yaml \
    --out "$WORK/det-$r" --device $DEVICE --deterministic --no-progress --set train.epochs=2
  check "deterministic-predict-$r" $CTR predict --bundle "$WORK/det-$r" --source criteo --input $D/test.tsv \
    --out "$WORK/det-$r.parquet"
done
check deterministic-identical $PY - "$WORK" <<'EOF'
import sys, polars as pl
w = sys.argv[1]
a, b = (pl.read_parquet(f"{w}/det-{r}.parquet") for r in "ab")
same = a.equals(b)
print("deterministic CUDA predictions identical:", same, "rows", a.height)
sys.exit(0 if same else 1)
EOF

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
check component-parallel-equal $PY - "$WORK" <<'EOF'
import sys
from safetensors.torch import load_file
w = sys.argv[1]
a, b = (load_file(f"{w}/{r}/bundle/model.safetensors") for r in ("cp-plain", "cp-1"))
diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")
print("component-parallel (1 rank) vs plain process, max |weight difference|:", diff)
sys.exit(0 if diff <= 1e-5 else 1)
EOF

step "GPU training benchmark (data resident on the GPU)"
# --check: exit 1 when a target (K = 4: >= 1 M ex/s at batch 4096, >= 1.5 x deepctr-torch x 4 at both
# batches, >= 2 x the loop of K models at batch 512) is missed or its row is flagged impossible. The
# quick run has no K = 4 row: it only checks that the benchmark runs.
if [ "$QUICK" = 1 ]; then
  check bench-train $PY benchmarks/bench_train.py --device $DEVICE --quick --check \
    --out "$OUT/train-$DEVICE-quick.json"
  finish
fi
check bench-train timeout $LONG_STEP_LIMIT $PY benchmarks/bench_train.py --device $DEVICE --ks 1 4 8 --batches 4096 512 \
  --check --out "$OUT/train-$DEVICE.json"

step "product training loop at scale on CUDA: 2M synthetic rows, criteo config, 1 epoch"
check synth $CTR synth --rows 2000000 --seed 11 --out "$WORK/s2m.tsv"
check ingest-2m $CTR ingest --source synthetic --input "$WORK/s2m.tsv" --out "$WORK/s2m" --workers 8 --quiet
check train-2m tee_to "$OUT/train-$DEVICE-2m.json" timeout $LONG_STEP_LIMIT $CTR train --data "$WORK/s2m" \
  --config pipelines/configs/criteo.yaml --out "$WORK/run-2m" --device $DEVICE --no-progress --set train.epochs=1
cp "$WORK/run-2m/metrics.jsonl" "$OUT/train-$DEVICE-2m-metrics.jsonl" 2>/dev/null
finish
