"""The bounded-memory part of the ingest benchmark: peak RSS and temporary disk at two row counts of
the ``criteo1tb`` synthetic profile (Criteo 1TB's per-field cardinalities, up to 40M values).

Each ingest runs in its own process; its peak RSS is the ``ru_maxrss`` that ``os.wait4`` returns for
that child (the kernel's high-water mark of the process, and of any child it waited for). Linux
starts a child's high-water mark at its parent's when it is spawned, so the driver never imports
polars or generates data itself (generation is a ``ctr-ad synth`` subprocess too), and its own
``ru_maxrss`` is recorded beside the figures: a child figure above it is the child's own. The
temporary disk is sampled every 0.2 s: the size of the ingest's staging directory (spills plus the
outputs being written) and of its spill directory alone.

Imported by ``bench_ingest.py`` (run as a script, so this is imported as ``ingest_memory``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
MIB = 1024**2
PROFILE = "criteo1tb"
TARGET_ROWS_LARGE = 20_000_000  # the target size; smaller runs say they are smaller
TARGET_RSS_RATIO = 1.3  # peak RSS(large) <= 1.3 x peak RSS(small)
TARGET_RSS_BYTES = 2 * GIB  # and <= 2 GiB
TARGET_TMP_DISK_RATIO = 1.5  # spill bytes <= ~1.5 x input bytes
SAMPLE_S = 0.2


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    maxrss_bytes: int  # ru_maxrss of the child (os.wait4)
    peak_staging_bytes: int
    peak_spill_bytes: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we looked (a spill read back and deleted)
                total += os.stat(os.path.join(root, name)).st_size
    return total


def run_child(cmd: list[str], out: Path, log_path: Path, timeout_s: float) -> ChildRun:
    """Run ``cmd`` (an ingest writing ``out``), sampling its staging directory; its rusage at exit."""
    load_before = os.getloadavg()
    peak_staging = peak_spill = 0
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            for staging in out.parent.glob(f".{out.name}.ingest-tmp-*"):
                peak_staging = max(peak_staging, _tree_bytes(staging))
                peak_spill = max(peak_spill, _tree_bytes(staging / ".spills"))
            if time.perf_counter() - start > timeout_s:
                proc.kill()
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return ChildRun(proc.returncode, wall, usage.ru_maxrss * 1024, peak_staging, peak_spill, load_before,
                    os.getloadavg())


def synth_file(work: Path, rows: int, seed: int, timeout_s: float) -> Path:
    """The ``criteo1tb`` log of ``rows`` rows, generated once (by a subprocess) and cached."""
    path = work / f"{PROFILE}-{rows}-seed{seed}.tsv"
    if not path.exists():
        print(f"[bench] generating {path.name} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "ctr_ad.cli", "synth", "--rows", str(rows), "--seed", str(seed),
                        "--profile", PROFILE, "--out", str(path)], cwd=ROOT, check=True, timeout=timeout_s)
    return path


def ingest_cmd(input_path: Path, out: Path, max_vocab: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "ctr_ad.cli", "ingest", "--source", "criteo", "--input", str(input_path),
           "--out", str(out), "--workers", "1", "--quiet"]
    return cmd + (["--max-vocab", str(max_vocab)] if max_vocab is not None else [])


def measure(work: Path, rows: tuple[int, int], seed: int, max_vocab: int, repeats: int,
            timeout_s: float, capped_only: bool = False) -> dict[str, Any]:
    """Peak RSS and temporary disk of ``ctr-ad ingest`` at both sizes, with a cap of ``max_vocab``
    values per field and (unless ``capped_only``) without; repeats interleaved; the section of
    results/ingest.json."""
    small, large = rows
    inputs = {n: synth_file(work, n, seed, timeout_s) for n in (small, large)}
    # The capped variant first: it is the one the 20M target is about, and uncapped runs take longer.
    variants = {f"max_vocab_{max_vocab}": max_vocab, "uncapped": None}
    if capped_only:
        del variants["uncapped"]
    runs: dict[str, dict[int, list[ChildRun]]] = {v: {small: [], large: []} for v in variants}
    for rep in range(repeats):
        for variant, cap in variants.items():
            for n in (small, large):
                out = work / "out" / f"mem-{variant}-{n}"
                shutil.rmtree(out, ignore_errors=True)
                r = run_child(ingest_cmd(inputs[n], out, cap), out, work / f"mem-{variant}-{n}.log", timeout_s)
                if r.returncode != 0:
                    raise SystemExit(f"[bench] {variant} at {n} rows failed ({r.returncode}); see "
                                     f"{work / f'mem-{variant}-{n}.log'}")
                runs[variant][n].append(r)
                print(f"[bench] memory {rep + 1}/{repeats} {variant:<18} {n:>10,} rows {r.wall_s:7.1f}s "
                      f"{r.maxrss_bytes / MIB:7.0f} MiB peak, spills {r.peak_spill_bytes / MIB:7.0f} MiB, "
                      f"load {r.load_before[0]:.1f}", file=sys.stderr, flush=True)
    driver_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    input_bytes = {n: inputs[n].stat().st_size for n in (small, large)}
    section: dict[str, Any] = {
        "profile": PROFILE, "rows": [small, large], "target_rows_large": TARGET_ROWS_LARGE,
        "at_target_size": large >= TARGET_ROWS_LARGE, "repeats": repeats, "seed": seed,
        "input_bytes": {str(n): b for n, b in input_bytes.items()},
        "rss": "ru_maxrss of the ingest process from os.wait4 (kernel high-water mark), 1 worker",
        "driver_maxrss_mib": round(driver_maxrss / MIB, 1),
        "temporary_disk": "peak size of the staging directory's .spills (block spills + count spills), "
                          "sampled every 0.2 s; staging = spills + outputs being written",
        "variants": {}, "targets": [],
    }
    for variant, per_size in runs.items():
        summary = {}
        for n, rs in per_size.items():
            rss = sorted(r.maxrss_bytes for r in rs)
            summary[str(n)] = {
                "peak_rss_mib": {"min": round(rss[0] / MIB, 1), "median": round(rss[len(rss) // 2] / MIB, 1),
                                 "max": round(rss[-1] / MIB, 1)},
                "wall_s": [round(r.wall_s, 1) for r in rs],
                "peak_spill_mib": round(max(r.peak_spill_bytes for r in rs) / MIB, 1),
                "peak_staging_mib": round(max(r.peak_staging_bytes for r in rs) / MIB, 1),
                "load_average_1m": [[round(r.load_before[0], 2), round(r.load_after[0], 2)] for r in rs],
            }
        rss_small = summary[str(small)]["peak_rss_mib"]["median"]
        rss_large = summary[str(large)]["peak_rss_mib"]["median"]
        ratio = rss_large / rss_small
        disk_ratio = max(r.peak_spill_bytes for r in per_size[large]) / input_bytes[large]
        section["variants"][variant] = {"max_vocab": variants[variant], "sizes": summary,
                                        "rss_ratio_large_over_small": round(ratio, 3),
                                        "spill_over_input_large": round(disk_ratio, 3)}
        section["targets"] += [
            {"name": f"memory_ratio_{variant}",
             "description": f"peak RSS at {large:,} rows <= {TARGET_RSS_RATIO:g} x at {small:,} rows "
                            f"({PROFILE}; the issue asks it at {TARGET_ROWS_LARGE:,})",
             "value": round(ratio, 3), "target": TARGET_RSS_RATIO, "met": ratio <= TARGET_RSS_RATIO},
            {"name": f"memory_absolute_{variant}", "description": f"peak RSS at {large:,} rows <= 2 GiB",
             "value_mib": rss_large, "target_mib": TARGET_RSS_BYTES / MIB,
             "met": rss_large * MIB <= TARGET_RSS_BYTES},
            {"name": f"temporary_disk_{variant}",
             "description": f"peak spill bytes at {large:,} rows <= {TARGET_TMP_DISK_RATIO:g} x the input",
             "value": round(disk_ratio, 3), "target": TARGET_TMP_DISK_RATIO,
             "met": disk_ratio <= TARGET_TMP_DISK_RATIO},
        ]
    return section
