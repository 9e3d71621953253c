"""Time and memory of the Criteo 1TB recipe (``--split days --resume``) on a small synthetic copy,
and a linear extrapolation to the full 24 days.

``ctr-ad synth`` writes ``--rows`` Criteo-like rows, cut into ``--days`` gzip "day" files; each
variant ingests them with ``ctr-ad ingest --source criteo --split days`` in a separate process
(round-robin, rotating order, ``--rounds`` times): ``w1`` (1 worker), ``w1-resume`` (the same with
``--resume``: the cost of the checkpoints) and ``w2`` (2 workers). Stored: wall time, CPU time
(user + sys of the whole process tree) and peak RSS of the tree as min/median/max, with the load
average, in ``benchmarks/results/criteo_days.json``.

The extrapolation is linear in rows and assumes perfect per-worker scaling: time on C cores =
(CPU seconds per row of the 1- or 2-worker run) x rows / C, with ``--workers C``. It is an estimate, not a
measurement: the main process's merge is serial, disks and gzip decoding may not keep up, and peak
memory grows with the number of distinct categorical values, not linearly with rows.

    python benchmarks/bench_criteo_days.py [--rows 1000000] [--days 4] [--rounds 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import sys
import tempfile
from pathlib import Path

from common import format_table, interleaved_windows, machine_info, run_measured, spread, utc_timestamp, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "criteo_days.json"
#: Criteo 1TB: 24 day files, about 4.37 billion rows in all.
CRITEO_1TB_ROWS = 4_373_472_329
EXTRAPOLATE_CORES = (2, 16, 64)


def make_days(rows: int, days: int, work: Path, env: dict[str, str]) -> list[Path]:
    """``day_0.gz`` … of ``rows`` synthetic rows (reused when ``work`` already has them)."""
    paths = [work / f"day_{d}.gz" for d in range(days)]
    stamp = work / f"days-{rows}-{days}.done"
    if stamp.exists() and all(p.exists() for p in paths):
        return paths
    tsv = work / f"synth-{rows}.tsv"
    if not tsv.exists():
        m = run_measured([sys.executable, "-m", "ctr_ad.cli", "synth", "--rows", str(rows), "--out", str(tsv)],
                         cwd=REPO, env=env)
        if m.returncode != 0:
            raise SystemExit(f"synth failed:\n{m.stderr}")
    per_day = -(-rows // days)
    with open(tsv, "rb") as src:
        for path in paths:
            with gzip.open(path, "wb", compresslevel=1) as dst:
                for _ in range(per_day):
                    line = src.readline()
                    if not line:
                        break
                    dst.write(line)
    stamp.touch()
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, help="keep the synthetic days here (default: a temporary dir)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="bench-days-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = make_days(args.rows, args.days, work, env)
        base = [sys.executable, "-m", "ctr_ad.cli", "ingest", "--quiet", "--source", "criteo", "--split", "days",
                "--input", *map(str, paths)]
        commands = {
            "w1": [*base, "--workers", "1"],
            "w1-resume": [*base, "--workers", "1", "--resume"],
            "w2": [*base, "--workers", "2"],
        }
        peaks: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}

        def window(name: str):
            def run(_round: int) -> float:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                m = run_measured([*commands[name], "--out", str(Path(tmp) / f"out-{name}")], cwd=REPO, env=env)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if m.returncode != 0:
                    raise SystemExit(f"{name}: failed:\n{m.stderr}")
                cpus[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                peaks[name].append(m.peak_rss_bytes / 2**20)
                return m.wall_s
            return run

        load_before = os.getloadavg()
        walls = interleaved_windows({n: window(n) for n in commands}, lambda n: None, args.rounds)
        load_after = os.getloadavg()
    per_10m = 10_000_000 / args.rows
    extrapolation = {}
    for name in ("w1", "w2"):  # w2's CPU time includes what handing blocks to workers costs
        cpu_per_row = spread(cpus[name])["median"] / args.rows
        for c in EXTRAPOLATE_CORES:
            extrapolation[f"{c}_cores_hours_from_{name}"] = round(cpu_per_row * CRITEO_1TB_ROWS / c / 3600, 1)
    result = {
        "benchmark": "criteo_days", "finished_at": utc_timestamp(), "rows": args.rows, "days": args.days,
        "machine": machine_info(["polars", "pyarrow"]),
        "load_average_before": load_before, "load_average_after": load_after,
        "variants": {n: {"wall_s": spread(walls[n]), "cpu_s": spread(cpus[n]), "peak_rss_mib": spread(peaks[n]),
                         "wall_s_per_10m_rows": spread(walls[n])["median"] * per_10m,
                         "cpu_s_per_10m_rows": spread(cpus[n])["median"] * per_10m} for n in commands},
        "extrapolation": {
            "assumption": "linear in rows; perfect per-worker scaling (--workers = cores) from the CPU time "
                          "of the 1-worker (w1) or 2-worker (w2) run; an estimate, not a measurement",
            "rows": CRITEO_1TB_ROWS, **extrapolation,
        },
    }
    write_json(RESULTS, result)
    print(format_table(["variant", "median s", "min s", "max s", "cpu s", "peak MiB", "s / 10M rows", "cpu s / 10M"], [
        [n, v["wall_s"]["median"], v["wall_s"]["min"], v["wall_s"]["max"], v["cpu_s"]["median"],
         v["peak_rss_mib"]["median"], v["wall_s_per_10m_rows"], v["cpu_s_per_10m_rows"]]
        for n, v in result["variants"].items()]))
    for name in ("w1", "w2"):
        print(f"Criteo 1TB ({CRITEO_1TB_ROWS:,} rows), extrapolated from {name}'s CPU time: " +
              ", ".join(f"{c} cores {extrapolation[f'{c}_cores_hours_from_{name}']} h" for c in EXTRAPOLATE_CORES))
    print(f"{args.rows} rows; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
