#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one script (a GPU machine is lent only now and then, for a
# few minutes): CUDA training with bf16 autocast on the real Criteo sample, deterministic CUDA reruns,
# batch prediction, the GPU training benchmark, and a full-size run of the product's training loop.
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh
#
# Python packages the GPU image lacks travel as wheels in .whl/ (see benchmarks/README.md).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu QUICK=1 checks the script itself on a machine without a GPU
QUICK=${QUICK:-0}
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
CTR="$PY -m ctr_ad.cli"
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, polars; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'polars', polars.__version__)"

step "ingest the real Criteo 8k sample"
D=data/criteo-kaggle-8k
$CTR ingest --source criteo --split files --input $D/train.tsv $D/dev.tsv $D/test.tsv --out "$WORK/c8k" --quiet

step "CUDA training, bf16 autocast (demo config)"
$CTR train --data "$WORK/c8k" --config pipelines/configs/demo.yaml --out "$WORK/run-cuda" --device $DEVICE \
  --no-progress | tee "$OUT/train-cuda-demo.json"

step "deterministic CUDA: two runs must give bit-identical predictions"
for r in a b; do
  $CTR train --data "$WORK/c8k" --config pipelines/configs/demo.yaml --out "$WORK/det-$r" --device $DEVICE \
    --deterministic --no-progress --set train.epochs=2 > "$WORK/det-$r.json" || echo "deterministic run $r FAILED"
  $CTR predict --bundle "$WORK/det-$r" --source criteo --input $D/test.tsv --out "$WORK/det-$r.parquet" \
    || echo "predict $r FAILED"
done
$PY - "$WORK" <<'EOF'
import sys, polars as pl
w = sys.argv[1]
a, b = (pl.read_parquet(f"{w}/det-{r}.parquet") for r in "ab")
print("deterministic CUDA predictions identical:", a.equals(b), "rows", a.height)
EOF

step "GPU training benchmark (data resident on the GPU)"
if [ "$QUICK" = 1 ]; then
  $PY benchmarks/bench_train.py --device $DEVICE --quick --out "$OUT/train-$DEVICE-quick.json"
  step "done (quick)"; exit 0
fi
$PY benchmarks/bench_train.py --device $DEVICE --ks 4 --batches 4096 512 --out "$OUT/train-$DEVICE.json"
$PY benchmarks/bench_train.py --device $DEVICE --ks 1 8 --batches 4096 512 --no-deepctr \
  --out "$OUT/train-$DEVICE-k1-k8.json"

step "product training loop at scale on CUDA: 2M synthetic rows, criteo config, 1 epoch"
$CTR synth --rows 2000000 --seed 11 --out "$WORK/s2m.tsv"
$CTR ingest --source synthetic --input "$WORK/s2m.tsv" --out "$WORK/s2m" --workers 8 --quiet
$CTR train --data "$WORK/s2m" --config pipelines/configs/criteo.yaml --out "$WORK/run-2m" --device $DEVICE \
  --no-progress --set train.epochs=1 | tee "$OUT/train-cuda-2m.json"
cp "$WORK/run-2m/metrics.jsonl" "$OUT/train-cuda-2m-metrics.jsonl" 2>/dev/null
step "done"
