# One entry point. Every target builds the local virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override e.g. TORCH_SPEC='torch==2.13.0 --index-url URL' for a CUDA host. Left unquoted in
# the recipe so that the shell splits it: pip gets the requirement and each option as separate arguments.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint bench bench-ingest bench-ingest-speed bench-ingest-memory bench-ingest-ray bench-train bench-train-quick bench-loader bench-threads bench-component-parallel bench-serve clean

$(VENV)/.installed: pyproject.toml ctr_ad/_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,bench,onnx,mlflow,ray]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m ctr_ad.cli pipeline run pipelines/demo.yaml

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15 tests

lint: venv
	$(VENV)/bin/ruff check .

bench: bench-ingest bench-train bench-loader bench-threads bench-serve

bench-ingest: venv
	$(PY) benchmarks/bench_ingest.py

# --engine ray against the local engine on 200k synthetic rows: cold CLI runs, then on a running Ray instance.
bench-ingest-ray: venv
	$(PY) benchmarks/bench_ingest_ray.py

# The speed part alone (2M rows; the memory targets quoted from results/ingest.json).
bench-ingest-speed: venv
	$(PY) benchmarks/bench_ingest.py --skip-memory --skip-flat

# The Criteo-1TB-profile memory part alone: 1M and 20M rows (20M: ~5 GB of text in benchmarks/work).
bench-ingest-memory: venv
	$(PY) benchmarks/bench_ingest.py --memory-only

# Full K x batch table with deepctr-torch: 21 min on the shared 2-core VM at load 5-10 (8.5 min with --threads 1).
bench-train: venv
	$(PY) benchmarks/bench_train.py

bench-train-quick: venv
	$(PY) benchmarks/bench_train.py --quick

# Loader steps/s (memory, stream; no model) against the training step at K = 4, batch 4096, in one run.
bench-loader: venv
	$(PY) benchmarks/bench_loader.py

# The chosen intra-op thread count against every fixed count, alone and beside two busy jobs.
bench-threads: venv
	$(PY) benchmarks/bench_threads.py

# Steps/s of one process against two component-parallel ranks (torchrun, gloo) at K = 4.
bench-component-parallel: venv
	$(PY) benchmarks/bench_component_parallel.py

# bench-serve drives the server with wrk (apt-get install wrk): a C client, so the load generator
# takes little of the CPU the server is measured on.
# Then the two serving backends (PyTorch bundle, onnxruntime graph) side by side: results/serve-backends.json.
bench-serve: venv
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_serve.py --backends torch onnxruntime

clean:
	rm -rf $(VENV) runs out benchmarks/work ctr_ad/_kernels*.so
