"""What reading a log by a declared schema costs next to the built-in source for the same log.

The Open Bandit sample (10,000 rows, 99 columns, one week of impressions) is repeated ``--copies``
times (copy ``c`` shifted by ``c`` weeks, so the log stays in time order) and ingested by
``ctr-ad ingest``:

* ``obd``: the built-in source (the baseline);
* ``table``: ``--source table`` with ``pipelines/schemas/open-bandit.yaml``, ``--split sequential``
  (the same splits, byte for byte);
* ``table-time``: the same with ``--split time`` (a second read of the input ranks the times; the
  log is in time order, so the splits are the same);
* ``table-parquet``: the same log as Parquet, ``--split sequential`` (the same rows and values; the
  files' bytes differ by their row groups, which follow the blocks read).

Variants run round-robin (rotating order) ``--rounds`` times in separate processes; wall time and peak
RSS are stored as min/median/max with the load average, in ``benchmarks/results/table_source.json``.

    python benchmarks/bench_table_source.py [--copies 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import polars as pl

from common import format_table, interleaved_windows, machine_info, run_measured, spread, utc_timestamp, write_json

REPO = Path(__file__).resolve().parents[1]
OBD = REPO / "data" / "open-bandit" / "random-all.csv"
SCHEMA = REPO / "pipelines" / "schemas" / "open-bandit.yaml"
RESULTS = REPO / "benchmarks" / "results" / "table_source.json"


def make_log(copies: int, work: Path) -> tuple[Path, Path]:
    """The sample repeated ``copies`` times, copy ``c`` shifted by ``c`` weeks, as CSV and as Parquet."""
    sample = pl.read_csv(OBD, infer_schema=False)
    stamp = pl.col("timestamp").str.to_datetime("%Y-%m-%d %H:%M:%S%.f%:z")
    frame = pl.concat([
        sample.with_columns((stamp + pl.duration(weeks=c)).dt.strftime("%Y-%m-%d %H:%M:%S%.6f%:z").alias("timestamp"))
        for c in range(copies)
    ])
    csv_path, pq_path = work / f"obd-x{copies}.csv", work / f"obd-x{copies}.parquet"
    frame.write_csv(csv_path)
    frame.write_parquet(pq_path)
    return csv_path, pq_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="bench-table-") as tmp:
        work = Path(tmp)
        csv_path, pq_path = make_log(args.copies, work)
        base = [sys.executable, "-m", "ctr_ad.cli", "ingest", "--quiet"]
        table = ["--source", "table", "--schema", str(SCHEMA)]
        commands = {
            "obd": [*base, "--source", "obd", "--input", str(csv_path)],
            "table": [*base, *table, "--split", "sequential", "--input", str(csv_path)],
            "table-time": [*base, *table, "--split", "time", "--input", str(csv_path)],
            "table-parquet": [*base, *table, "--split", "sequential", "--input", str(pq_path)],
        }
        peaks: dict[str, list[float]] = {name: [] for name in commands}
        fingerprints: dict[str, str] = {}
        contents: dict[str, pl.DataFrame] = {}

        def window(name: str):
            def run(round_: int) -> float:
                out = work / f"out-{name}"
                m = run_measured([*commands[name], "--out", str(out)], cwd=REPO, env=env)
                if m.returncode != 0:
                    raise SystemExit(f"{name}: failed:\n{m.stderr}")
                peaks[name].append(m.peak_rss_bytes / 2**20)
                splits = b"".join((out / f"{s}.parquet").read_bytes() for s in ("train", "valid", "test"))
                fingerprints[name] = hashlib.sha256(splits).hexdigest()[:16]
                contents[name] = pl.concat([pl.read_parquet(out / f"{s}.parquet").with_columns(split=pl.lit(s))
                                            for s in ("train", "valid", "test")])
                return m.wall_s
            return run

        load_before = os.getloadavg()
        walls = interleaved_windows({n: window(n) for n in commands}, lambda n: None, args.rounds)
        load_after = os.getloadavg()
    rows = pl.read_csv(OBD, infer_schema=False).height * args.copies
    base_wall = spread(walls["obd"])["median"]
    result = {
        "benchmark": "table_source", "finished_at": utc_timestamp(), "rows": rows, "copies": args.copies,
        "machine": machine_info(["polars", "pyarrow"]),
        "load_average_before": load_before, "load_average_after": load_after,
        "variants": {n: {"wall_s": spread(walls[n]), "peak_rss_mib": spread(peaks[n]),
                         "wall_ratio_to_obd": spread(walls[n])["median"] / base_wall,
                         "splits_sha256_16": fingerprints[n],
                         "same_rows_and_values_as_obd": contents[n].equals(contents["obd"])} for n in commands},
    }
    write_json(RESULTS, result)
    print(format_table(["variant", "median s", "min s", "max s", "× obd", "peak MiB", "splits", "= obd"], [
        [n, v["wall_s"]["median"], v["wall_s"]["min"], v["wall_s"]["max"], v["wall_ratio_to_obd"],
         v["peak_rss_mib"]["median"], v["splits_sha256_16"], str(v["same_rows_and_values_as_obd"])]
        for n, v in result["variants"].items()]))
    print(f"{rows} rows; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
