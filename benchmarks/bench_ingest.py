"""Ingest benchmark: ``ctr-ad ingest`` against the polars parse-and-write floor and the usual pandas
script, on synthetic Criteo logs.

Every measured run is its own process, so wall time includes interpreter start-up and imports (what a
user of either tool pays) and peak RSS is not polluted by the driver's memory or an earlier run.
Repeats are interleaved round-robin (A B C, A B C, ...) rather than back-to-back (A A A, B B B) so a
slow phase of a noisy machine hits every configuration alike; medians are reported.

    python benchmarks/bench_ingest.py                    # 2M rows main, 1M/5M flatness, 3 repeats,
                                                         # then criteo1tb memory at 1M/20M
    python benchmarks/bench_ingest.py --quick            # smoke run on tiny files
    python benchmarks/bench_ingest.py --memory-only --rows-memory 1000000 5000000   # that part alone
    python benchmarks/bench_ingest.py --skip-memory      # speed part; memory targets from the results file
    python benchmarks/bench_ingest.py --baseline --input F --out DIR   # the pandas baseline alone
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
DEFAULT_WORK = BENCH_DIR / "work"
DEFAULT_RESULTS = BENCH_DIR / "results" / "ingest.json"
SEED = 1

# Targets (see benchmarks/README.md): ours vs the pandas baseline at the main size, both single-process.
TARGET_SPEEDUP = 5.0  # ours rows/s >= 5 x baseline rows/s
TARGET_FLOOR_RATIO = 2.0  # ours wall time <= 2 x the polars scan -> sink floor's on the same file
TARGET_MEMORY_RATIO = 1 / 3  # ours peak RSS <= 1/3 of baseline peak RSS
TARGET_FLATNESS = 1.3  # RSS(large) <= 1.3 x RSS(small): memory must not grow with the input

#: Prefixes of the names of the bounded-memory targets (ingest_memory.measure).
MEMORY_TARGETS = ("memory_ratio_", "memory_absolute_", "temporary_disk_")

CRITEO_LABEL = "label"
CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]


# --------------------------------------------------------------------------------------- baseline
def run_baseline(input_path: Path, out_dir: Path, valid_frac: float = 0.1, test_frac: float = 0.1,
                 min_count: int = 2) -> dict[str, Any]:
    """The same ingest, written the way a pandas user usually would: load everything, then transform.

    Same outputs as ``ctr-ad ingest`` (sequential 80/10/10 split; vocab fit on train with min_count,
    ordered by count then value, 0 = missing, 1 = unknown; dense clip -> log1p -> standardise on train,
    missing -> 0 plus a ``__missing`` indicator; zstd Parquet), but without line validation/quarantine.
    Imports stay inside so this process never loads polars or ctr_ad.
    """
    import numpy as np
    import pandas as pd

    names = [CRITEO_LABEL, *CRITEO_DENSE, *CRITEO_CATEGORICAL]
    df = pd.read_csv(input_path, sep="\t", header=None, names=names)
    n = len(df)
    n_test = round(n * test_frac)
    n_valid = round(n * valid_frac)
    n_train = n - n_valid - n_test

    df[CRITEO_LABEL] = df[CRITEO_LABEL].astype(np.float32)
    cardinalities = {}
    for c in CRITEO_CATEGORICAL:
        s = df[c]
        counts = s.iloc[:n_train].value_counts()  # NaN (missing) is dropped by default
        counts = counts[counts >= min_count]
        # value_counts leaves ties in arbitrary order; sort by (count desc, value asc) as ours does.
        vocab = counts.rename_axis("value").reset_index().sort_values(
            ["count", "value"], ascending=[False, True])["value"]
        mapping = pd.Series(np.arange(2, len(vocab) + 2, dtype=np.int32), index=vocab.to_numpy())
        codes = s.map(mapping).fillna(1)  # unknown -> 1
        df[c] = codes.where(s.notna(), 0).astype(np.int32)  # missing -> 0
        cardinalities[c] = len(vocab) + 2
    for c in CRITEO_DENSE:
        x = df[c]
        missing = x.isna()
        x = np.log1p(x.clip(lower=0))
        train = x.iloc[:n_train]
        mean, std = train.mean(), train.std(ddof=0)
        df[c] = ((x - mean) / (std if std > 1e-12 else 1.0)).fillna(0.0).astype(np.float32)
        df[c + "__missing"] = missing.astype(np.float32)

    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, n)}
    for name, (lo, hi) in bounds.items():
        df.iloc[lo:hi].to_parquet(out_dir / f"{name}.parquet", engine="pyarrow", compression="zstd",
                                  index=False)
    return {"rows": n, "splits": {k: hi - lo for k, (lo, hi) in bounds.items()},
            "cardinalities": [cardinalities[c] for c in CRITEO_CATEGORICAL]}


def run_floor(input_path: Path, out_dir: Path) -> dict[str, Any]:
    """The parse-and-write floor any ingest pays: polars reads every field as text and streams it to
    zstd Parquet (``scan_csv`` -> ``sink_parquet``), with no validation, counting or encoding."""
    import polars as pl

    names = [CRITEO_LABEL, *CRITEO_DENSE, *CRITEO_CATEGORICAL]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "floor.parquet"
    pl.scan_csv(input_path, separator="\t", has_header=False, new_columns=names, infer_schema=False,
                quote_char=None).sink_parquet(out, compression="zstd")
    return {"rows": pl.scan_parquet(out).select(pl.len()).collect().item()}


# --------------------------------------------------------------------------------------- driver
@dataclass
class Config:
    name: str
    kind: str  # "ours", "baseline" or "floor"
    rows: int
    workers: int = 1
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def out_dir(self, work: Path) -> Path:
        return work / "out" / self.name

    def median_wall(self) -> float:
        from common import median

        return median(self.walls)

    def median_rss(self) -> int:
        from common import median

        return int(median(self.rss))

    def rows_per_s(self) -> float:
        return self.rows / self.median_wall()

    def wall_spread(self) -> dict[str, float]:
        from common import spread

        return {k: round(v, 3) for k, v in spread(self.walls).items()}


def dataset(work: Path, rows: int, seed: int) -> Path:
    """The synthetic log of ``rows`` rows, generated once and cached (generation is deterministic)."""
    path = work / f"criteo-{rows}-seed{seed}.tsv"
    if not path.exists():
        from ctr_ad.synthetic import write_synthetic

        t = time.perf_counter()
        print(f"[bench] generating {path.name} ...", file=sys.stderr, flush=True)
        write_synthetic(path, rows, seed)  # writes to a temp name and renames: a cache hit is complete
        print(f"[bench]   {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return path


def source_fingerprint() -> str:
    """Hash of the code under test, so a results file can be tied to it even from a dirty worktree."""
    import hashlib

    h = hashlib.sha256()
    files = [*sorted((ROOT / "ctr_ad" / "ingest").glob("*.py")),
             ROOT / "ctr_ad" / "features.py", ROOT / "ctr_ad" / "schema.py", ROOT / "ctr_ad" / "vocabulary.py",
             ROOT / "ctr_ad" / "native.py", ROOT / "ctr_ad" / "_kernels.c"]
    for f in files:
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def warm_page_cache(path: Path) -> None:
    """Read the file once so every measured run (ours and the baseline alike) sees a warm cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def command(cfg: Config, input_path: Path, out: Path) -> list[str]:
    if cfg.kind == "ours":
        return [sys.executable, "-m", "ctr_ad.cli", "ingest", "--source", "criteo",
                "--input", str(input_path), "--out", str(out), "--workers", str(cfg.workers), "--quiet"]
    return [sys.executable, str(Path(__file__).resolve()), f"--{cfg.kind}", "--input", str(input_path),
            "--out", str(out)]


def check_equivalence(ours: Path, base: Path) -> dict[str, Any]:
    """Compare the two tools' train splits column by column: proof the baseline does the same work."""
    import numpy as np
    import pyarrow.parquet as pq

    a = pq.read_table(ours / "train.parquet")
    b = pq.read_table(base / "train.parquet")
    mismatched: list[str] = []
    max_dense_diff = 0.0
    for name in a.column_names:
        if name not in b.column_names:
            mismatched.append(name)
            continue
        x = a.column(name).to_numpy()
        y = b.column(name).to_numpy()
        if name in CRITEO_CATEGORICAL or name.endswith("__missing") or name == CRITEO_LABEL:
            if not np.array_equal(x, y):
                mismatched.append(name)
        else:  # ours accumulates moments in a stream, pandas in one pass: allow float32 rounding noise
            diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if len(x) else 0.0
            max_dense_diff = max(max_dense_diff, diff)
            if diff > 1e-3:
                mismatched.append(name)
    return {"rows_ours": a.num_rows, "rows_baseline": b.num_rows, "columns_compared": a.num_columns,
            "mismatched_columns": mismatched, "max_abs_dense_diff": max_dense_diff,
            "equivalent": a.num_rows == b.num_rows and not mismatched}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows-main", type=int, default=None,
                   help="rows of the ours-vs-baseline file (default 2,000,000; 50,000 with --quick)")
    p.add_argument("--rows-flat", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                   help="two sizes at which ours' peak RSS is compared, for memory flatness "
                        "(default 1,000,000 5,000,000; 20,000 100,000 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 50k/20k/100k rows, 1 repeat, results to the work dir")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per configuration (default 3; 1 with --quick)")
    p.add_argument("--workers-alt", type=int, default=2, help="extra run of ours with this many workers")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument("--results", type=Path, default=None,
                   help=f"JSON output (default {DEFAULT_RESULTS.relative_to(ROOT)}; work dir with --quick)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a single run is killed")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed (for CI)")
    p.add_argument("--rows-memory", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                   help="bounded memory: the two sizes of the criteo1tb profile whose peak RSS is compared "
                        "(default 1,000,000 20,000,000; 20,000 100,000 with --quick)")
    p.add_argument("--memory-max-vocab", type=int, default=100_000,
                   help="bounded memory: the --max-vocab of the capped variant (the other is uncapped)")
    p.add_argument("--markdown", action="store_true",
                   help="print the README tables of the results file and exit (nothing is run)")
    p.add_argument("--memory-capped-only", action="store_true",
                   help="bounded memory: measure only the capped variant (the uncapped one at 20M rows "
                        "holds millions of kept values and takes far longer)")
    p.add_argument("--memory-repeats", type=int, default=None, help="bounded memory: runs per size and "
                   "variant (default: --repeats)")
    p.add_argument("--memory-only", action="store_true",
                   help="run only the bounded-memory part; its section replaces 'bounded_memory' in the "
                        "results file and the rest of the file is kept")
    p.add_argument("--skip-memory", action="store_true",
                   help="skip the bounded-memory part (20M rows take long); its targets are quoted from "
                        "the results file's stored 'bounded_memory' section")
    p.add_argument("--skip-flat", action="store_true",
                   help="skip the 1M/5M flatness runs of the uniform generator (the criteo1tb memory part "
                        "is the memory test the issue asks for)")
    # Internal: run the pandas baseline or the polars floor in this process (the driver starts them
    # as subprocesses).
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rows_main is None:
        args.rows_main = 50_000 if args.quick else 2_000_000
    if args.rows_flat is None:
        args.rows_flat = [20_000, 100_000] if args.quick else [1_000_000, 5_000_000]
    if args.rows_memory is None:
        args.rows_memory = [20_000, 100_000] if args.quick else [1_000_000, 20_000_000]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.memory_repeats is None:
        args.memory_repeats = args.repeats
    if args.results is None:
        args.results = args.work_dir / "ingest-quick.json" if args.quick else DEFAULT_RESULTS
    return args


def speed_configs(args: argparse.Namespace) -> tuple[list[Config], tuple[Config, Config] | None]:
    """The runs of the speed part (ours with 1 worker, the pandas baseline, ours with more workers,
    the polars floor, then the flatness sizes), and the flatness pair (small, large) unless skipped."""
    main_n = args.rows_main
    small, large = args.rows_flat
    configs = [
        Config(f"ours-w1-{main_n}", "ours", main_n, 1),
        Config(f"baseline-{main_n}", "baseline", main_n),
        Config(f"ours-w{args.workers_alt}-{main_n}", "ours", main_n, args.workers_alt),
        Config(f"floor-{main_n}", "floor", main_n),
    ]
    if not args.skip_flat:
        configs += [Config(f"ours-w1-{small}", "ours", small, 1), Config(f"ours-w1-{large}", "ours", large, 1)]
    # The same size may serve both roles (e.g. --rows-main equal to a flatness size): measure it once.
    unique: dict[str, Config] = {}
    for cfg in configs:
        unique.setdefault(cfg.name, cfg)
    flat_pair = None if args.skip_flat else (unique[f"ours-w1-{small}"], unique[f"ours-w1-{large}"])
    return list(unique.values()), flat_pair


def measure_rounds(configs: list[Config], inputs: dict[int, Path], args: argparse.Namespace, work: Path
                   ) -> tuple[dict[str, Any] | None, dict[str, set[str]], dict[str, Any] | None]:
    """Every config once per repeat, interleaved; (train-split equivalence with the baseline, our
    fingerprints per size, the baseline's own summary)."""
    from common import MIB, run_measured

    equivalence: dict[str, Any] | None = None
    fingerprints: dict[str, set[str]] = {}
    baseline_summary: dict[str, Any] | None = None
    for rep in range(args.repeats):
        for cfg in configs:
            out = cfg.out_dir(work)
            shutil.rmtree(out, ignore_errors=True)  # outside the timed region
            load_before = os.getloadavg()
            m = run_measured(command(cfg, inputs[cfg.rows], out), cwd=ROOT, timeout_s=args.timeout)
            if m.returncode != 0:
                print(m.stdout + m.stderr, file=sys.stderr)
                raise SystemExit(f"[bench] {cfg.name} failed with exit code {m.returncode}")
            cfg.walls.append(m.wall_s)
            cfg.rss.append(m.peak_rss_bytes)
            run = {**m.summary(), "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
            if cfg.kind == "ours":
                manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
                run["internal_elapsed_s"] = manifest["run"]["elapsed_s"]
                fingerprints.setdefault(str(cfg.rows), set()).add(manifest["fingerprint"])
            elif cfg.kind == "baseline":
                baseline_summary = json.loads(m.stdout.strip().splitlines()[-1])
            cfg.runs.append(run)
            print(f"[bench] repeat {rep + 1}/{args.repeats} {cfg.name:<22} {m.wall_s:7.1f}s "
                  f"{m.peak_rss_bytes / MIB:8.0f} MiB", file=sys.stderr, flush=True)
        if equivalence is None:
            equivalence = check_equivalence(configs[0].out_dir(work), configs[1].out_dir(work))
    return equivalence, fingerprints, baseline_summary


def speed_figures(configs: list[Config], flat_pair: tuple[Config, Config] | None, args: argparse.Namespace
                  ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The speed part's targets (each with ``met``) and its ratios, from the measured configs."""
    ours_main, base_main, ours_alt, floor_main = configs[0], configs[1], configs[2], configs[3]
    small, large = args.rows_flat
    speedup = ours_main.rows_per_s() / base_main.rows_per_s()
    speedup_alt = ours_alt.rows_per_s() / base_main.rows_per_s()
    floor_ratio = ours_main.median_wall() / floor_main.median_wall()
    floor_ratio_alt = ours_alt.median_wall() / floor_main.median_wall()
    memory_ratio = ours_main.median_rss() / base_main.median_rss()
    targets = [
        {"name": "floor_ratio",
         "description": f"ours (workers=1) wall time <= {TARGET_FLOOR_RATIO:g} x the polars scan_csv -> "
                        f"sink_parquet floor's, same file, same run",
         "value": round(floor_ratio, 3), "target": TARGET_FLOOR_RATIO, "met": floor_ratio <= TARGET_FLOOR_RATIO},
        {"name": "throughput",
         "description": f"ours (workers=1) rows/s >= {TARGET_SPEEDUP:g} x baseline rows/s",
         "value": round(speedup, 3), "target": TARGET_SPEEDUP, "met": speedup >= TARGET_SPEEDUP},
        {"name": "peak_memory", "description": "ours (workers=1) peak RSS <= 1/3 of baseline peak RSS",
         "value": round(memory_ratio, 3), "target": round(TARGET_MEMORY_RATIO, 4),
         "met": memory_ratio <= TARGET_MEMORY_RATIO},
    ]
    flatness = flat_pair[1].median_rss() / flat_pair[0].median_rss() if flat_pair is not None else None
    if flatness is not None:
        targets.append({"name": "memory_flatness",
                        "description": f"ours peak RSS at {large} rows <= {TARGET_FLATNESS:g} x at {small} rows",
                        "value": round(flatness, 3), "target": TARGET_FLATNESS, "met": flatness <= TARGET_FLATNESS})
    ratios = {"wall_ours_w1_over_floor": round(floor_ratio, 3),
              f"wall_ours_w{args.workers_alt}_over_floor": round(floor_ratio_alt, 3),
              "throughput_ours_w1_over_baseline": round(speedup, 3),
              f"throughput_ours_w{args.workers_alt}_over_baseline": round(speedup_alt, 3),
              "peak_rss_ours_w1_over_baseline": round(memory_ratio, 3),
              f"peak_rss_ours_w{args.workers_alt}_over_baseline":
                  round(ours_alt.median_rss() / base_main.median_rss(), 3),
              **({f"peak_rss_ours_{large}_over_{small}": round(flatness, 3)} if flatness is not None else {})}
    return targets, ratios


def print_summary(result: dict[str, Any], configs: list[Config], args: argparse.Namespace) -> None:
    from common import MIB, format_table

    equivalence = result["checks"]["train_split_equivalent_to_baseline"]
    ratios = result["ratios"]
    rows = [[c.name, c.rows, c.workers if c.kind == "ours" else "-", c.wall_spread()["min"], c.wall_spread()["median"],
             c.wall_spread()["max"], c.rows_per_s(), c.median_rss() / MIB] for c in configs]
    print(format_table(["config", "rows", "workers", "wall s min", "median", "max", "rows/s", "peak RSS MiB"],
                       rows))
    print()
    print(headline(result))
    print(f"\nworkers={args.workers_alt}: {ratios[f'throughput_ours_w{args.workers_alt}_over_baseline']:.2f}x "
          f"baseline rows/s; "
          f"train split equivalent to baseline: {equivalence and equivalence['equivalent']}")
    print(f"results: {args.results}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline or args.floor:
        if args.input is None or args.out is None:
            raise SystemExit("--baseline/--floor need --input and --out")
        print(json.dumps((run_baseline if args.baseline else run_floor)(args.input, args.out)))
        return 0

    sys.path.insert(0, str(BENCH_DIR))  # `common` sits beside this script
    sys.path.insert(0, str(ROOT))  # ctr_ad for data generation when not installed
    if args.markdown:
        print(markdown_tables(json.loads(args.results.read_text(encoding="utf-8"))))
        return 0
    from common import MIB, machine_info, utc_timestamp, write_json

    started = utc_timestamp()
    code_before = source_fingerprint()
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    # First, while this driver is still small (no polars, no generated data): a child's ru_maxrss
    # starts at its parent's, so the children measured here must be spawned from a lean process.
    # --skip-memory quotes the stored section, read when the results are written (below), so a
    # --memory-only run going on beside this one is not overwritten by an older copy.
    memory = None if args.skip_memory else bounded_memory(args, work)
    if args.skip_memory:
        stored_memory(args)  # fail now, not after the runs, when there is nothing to quote
    if args.memory_only:
        return 0
    small, large = args.rows_flat
    sizes = {args.rows_main} if args.skip_flat else {args.rows_main, small, large}
    inputs = {n: dataset(work, n, args.seed) for n in sorted(sizes)}
    for path in inputs.values():
        warm_page_cache(path)

    configs, flat_pair = speed_configs(args)
    main_n = args.rows_main
    equivalence, fingerprints, baseline_summary = measure_rounds(configs, inputs, args, work)

    targets, ratios = speed_figures(configs, flat_pair, args)
    from ctr_ad import native

    result = {
        "benchmark": "ingest",
        "started_at": started,
        "finished_at": utc_timestamp(),
        "machine": machine_info(["polars", "pandas", "pyarrow", "numpy", "psutil"]),
        "settings": {"rows_main": main_n, "rows_flat": None if args.skip_flat else [small, large],
                     "repeats": args.repeats,
                     "seed": args.seed, "quick": args.quick, "workers_alt": args.workers_alt,
                     "rss": "peak of the summed RSS of the process tree, sampled every 20 ms "
                            "(or a single process's kernel high-water mark VmHWM if higher)",
                     "wall": "whole process: interpreter start-up, imports, ingest, exit",
                     # ours with ctr_ad/_kernels.c compiled (False: the polars/numpy path)
                     "compiled_kernels": native.available()},
        "configs": {c.name: {"kind": c.kind, "rows": c.rows, "workers": c.workers,
                             "median_wall_s": round(c.median_wall(), 3),
                             "wall_s": c.wall_spread(),
                             "rows_per_s": round(c.rows_per_s(), 1),
                             "median_peak_rss_mib": round(c.median_rss() / MIB, 1),
                             "runs": c.runs} for c in configs},
        "ratios": ratios,
        "targets": targets,
        "bounded_memory": memory,
        "checks": {"train_split_equivalent_to_baseline": equivalence,
                   "baseline_summary": baseline_summary,
                   # The pipeline promises byte-identical outputs for any worker count.
                   "ours_fingerprint_identical_across_runs_and_workers":
                       {rows: len(fps) == 1 for rows, fps in fingerprints.items()}},
    }
    if memory is None:
        memory = stored_memory(args)
    result["targets"] += memory["targets"]
    result["bounded_memory"] = memory
    code_after = source_fingerprint()
    if code_after != code_before:  # someone edited the pipeline mid-run: the numbers mix two versions
        print("[bench] WARNING: ctr_ad ingest sources changed during the run", file=sys.stderr)
    result["settings"]["ours_source_sha256"] = code_before
    result["settings"]["ours_source_changed_during_run"] = code_after != code_before
    write_json(args.results, result)

    print_summary(result, configs, args)
    return 1 if args.check and not all(t["met"] for t in result["targets"]) else 0


def _load_span(runs: list[dict[str, Any]]) -> str:
    loads = [x for r in runs for x in r.get("load_average_1m", [])]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "—"


def markdown_tables(result: dict[str, Any]) -> str:
    """benchmarks/README.md's ingest tables of a result: every configuration (wall min / median /
    max), every target with ``met``, and the bounded-memory runs. tests/test_bench_docs.py checks the
    README holds exactly these, so the document and ``results/ingest.json`` cannot drift apart."""
    lines = ["| config | rows | workers | wall s min / median / max | rows/s | peak RSS MiB | load (1 min) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in result["configs"].items():
        w = c["wall_s"]
        lines.append(f"| {name} | {c['rows']:,} | {c['workers'] if c['kind'] == 'ours' else '—'} "
                     f"| {w['min']:.1f} / {w['median']:.1f} / {w['max']:.1f} | {c['rows_per_s']:,.0f} "
                     f"| {c['median_peak_rss_mib']:,.0f} | {_load_span(c['runs'])} |")
    lines += ["", "| target | value | requirement | met |", "|---|---:|---|---|"]
    for t in result["targets"]:
        value = t.get("value", t.get("value_mib"))
        target = t.get("target", t.get("target_mib"))
        unit = " MiB" if "value_mib" in t else ""
        sense = "≥" if t["name"] == "throughput" else "≤"
        lines.append(f"| {t['name']} | {value:g}{unit} | {sense} {target:g}{unit} | {str(t['met']).lower()} |")
    memory = result["bounded_memory"]
    lines += ["", "| variant | rows | input MiB | peak RSS MiB | peak spills MiB | spills / input | wall s "
                  "| load (1 min) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, v in memory["variants"].items():
        for n, size in v["sizes"].items():
            input_mib = memory["input_bytes"][n] / 1024**2
            loads = [x for pair in size["load_average_1m"] for x in pair]
            lines.append(f"| {variant} | {int(n):,} | {input_mib:,.0f} | {size['peak_rss_mib']['median']:,.0f} "
                         f"| {size['peak_spill_mib']:,.0f} | {size['peak_spill_mib'] / input_mib:.2f} "
                         f"| {', '.join(f'{x:.0f}' for x in size['wall_s'])} "
                         f"| {min(loads):.1f}–{max(loads):.1f} |")
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> str:
    """The three figures the issue asks for (floor ratio, pandas ratio, 1M -> 20M memory ratio), each
    with ``met``, then every other target."""
    from common import format_table

    rows = []
    for t in result["targets"]:
        value = t.get("value", t.get("value_mib"))
        target = t.get("target", t.get("target_mib"))
        sense = ">= " if t["name"] == "throughput" else "<= "
        rows.append([t["name"], value, sense + f"{target:g}", str(t["met"]).lower()])
    memory = result.get("bounded_memory") or {}
    note = (f"memory part: {memory.get('rows')} rows of {memory.get('profile')}, measured "
            f"{memory.get('finished_at')}" + (" (stored; --skip-memory)" if memory.get("stored") else ""))
    return format_table(["target", "value", "target", "met"], rows) + "\n" + note


def stored_memory(args: argparse.Namespace) -> dict[str, Any]:
    """``--skip-memory``: the bounded-memory section of the results file as it is (marked stored)."""
    if not args.results.exists():
        raise SystemExit(f"--skip-memory: {args.results} has no bounded_memory section to quote; run "
                         f"--memory-only first")
    section = json.loads(args.results.read_text(encoding="utf-8")).get("bounded_memory")
    if not section:
        raise SystemExit(f"--skip-memory: {args.results} has no bounded_memory section; run --memory-only first")
    return {**{k: v for k, v in section.items() if k != "stored"}, "stored": True}


def bounded_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The criteo1tb memory part (``ingest_memory``); with ``--memory-only`` it is saved into the
    results file at once, keeping the file's other sections."""
    import os

    import ingest_memory
    from common import machine_info, utc_timestamp, write_json

    started = utc_timestamp()
    section = ingest_memory.measure(work, tuple(args.rows_memory), args.seed, args.memory_max_vocab,
                                    args.memory_repeats, args.timeout, capped_only=args.memory_capped_only)
    section = {"started_at": started, "finished_at": utc_timestamp(),
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
               "ours_source_sha256": source_fingerprint(), **section}
    for t in section["targets"]:
        print(f"[bench] {t['name']:<36} {t.get('value', t.get('value_mib'))!s:>8}  met: {t['met']}",
              file=sys.stderr)
    if args.memory_only:
        previous = json.loads(args.results.read_text(encoding="utf-8")) if args.results.exists() else {}
        previous.setdefault("benchmark", "ingest")
        previous["bounded_memory"] = {"machine": machine_info(["polars", "pyarrow", "numpy", "psutil"]),
                                      **section}
        if "targets" in previous:  # the top-level list quotes the memory targets too: refresh them
            previous["targets"] = [*(t for t in previous["targets"] if not t["name"].startswith(MEMORY_TARGETS)),
                                   *section["targets"]]
            print(headline(previous))
        write_json(args.results, previous)
        print(f"results: {args.results} (bounded_memory)")
    return section


if __name__ == "__main__":
    sys.exit(main())
