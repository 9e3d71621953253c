"""The Criteo 1TB layout end to end, on tiny "days" cut from the real Criteo sample: ``--split days``
(train on all days but the last, whose first half is test and second half valid), per-file progress,
and ``--resume`` after a kill giving byte-identical output."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from ctr_ad.errors import UserError
from ctr_ad.ingest.resume import work_dir
from ctr_ad.ingest.run import KILL_AFTER_FILE_ENV, run_ingest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "criteo-kaggle-8k" / "train.tsv"
DAY_LINES = (1800, 1801, 1800, 1799)  # 7200 lines; an odd last day checks the rounding of its halves
BAD_LINE = b"1\tnot-a-number\n"  # quarantined: the day files are not all clean, as real logs are


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> tuple[list[Path], list[list[bytes]]]:
    """day_0.gz … day_3.gz and each day's data lines (the bad line of day 1 included)."""
    folder = tmp_path_factory.mktemp("criteo-days")
    lines = TRAIN.read_bytes().splitlines(keepends=True)
    assert len(lines) == sum(DAY_LINES)
    paths, per_day, start = [], [], 0
    for day, n in enumerate(DAY_LINES):
        chunk = lines[start:start + n]
        start += n
        if day == 1:
            chunk = [*chunk[:100], BAD_LINE, *chunk[100:]]
        path = folder / f"day_{day}.gz"
        path.write_bytes(gzip.compress(b"".join(chunk), mtime=0))
        paths.append(path)
        per_day.append(chunk)
    return paths, per_day


def labels(lines: list[bytes]) -> list[int]:
    return [int(line.split(b"\t", 1)[0]) for line in lines if line != BAD_LINE]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every output file's bytes; the manifest without its "run" section (timings, finish time)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("run")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctr_ad.cli", "ingest", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_split_days_trains_on_all_but_the_last_day_and_halves_it(days, tmp_path):
    paths, per_day = days
    manifest = run_ingest(paths, "criteo", tmp_path / "data", split="days", quiet=True)
    last = per_day[-1]
    n_test = (len(last) + 1) // 2  # the first half, rounded up (DLRM / MLPerf)
    assert n_test == 900
    assert manifest["splits"] == {"train": 5401, "valid": 899, "test": 900}
    assert manifest["rows"]["quarantined"] == 1 and manifest["options"]["split"] == "days"
    got = {s: pl.read_parquet(tmp_path / "data" / f"{s}.parquet").get_column("label").to_list()
           for s in ("train", "valid", "test")}
    assert got["train"] == labels([line for day in per_day[:-1] for line in day])
    assert got["test"] == labels(last[:n_test])
    assert got["valid"] == labels(last[n_test:])
    quarantine = (tmp_path / "data" / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == 1 and json.loads(quarantine[0])["file"].endswith("day_1.gz")


def test_split_days_needs_two_files_in_day_order(days, tmp_path):
    paths, _ = days
    with pytest.raises(UserError, match="--split days takes at least 2 inputs"):
        run_ingest(paths[:1], "criteo", tmp_path / "data", split="days", quiet=True)
    with pytest.raises(UserError, match=r"not in day order \(day_0.gz, day_2.gz, day_1.gz\)"):
        run_ingest([paths[0], paths[2], paths[1]], "criteo", tmp_path / "data", split="days", quiet=True)
    assert not (tmp_path / "data").exists()


def test_a_killed_resumable_run_restarts_from_the_last_finished_file(days, tmp_path):
    paths, _ = days
    reference = tmp_path / "reference"
    run_ingest(paths, "criteo", reference, split="days", quiet=True)

    out = tmp_path / "data"
    args = ["--source", "criteo", "--split", "days", "--resume", "--out", str(out),
            "--input", *map(str, paths)]
    killed = cli(*args, env={KILL_AFTER_FILE_ENV: "1"})  # dies by SIGKILL once day_1 is checkpointed
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "rows/s" not in killed.stderr  # no progress bar on a pipe unless asked
    work = work_dir(out)
    assert sorted(p.name for p in work.glob("file-*/done.json")) == ["done.json", "done.json"]
    assert sorted(p.parent.name for p in work.glob("file-*/done.json")) == ["file-00000", "file-00001"]
    assert not out.exists()

    rerun = cli(*args, "--progress")
    assert rerun.returncode == 0, rerun.stderr
    reused = [line for line in rerun.stderr.splitlines() if "finished by an earlier run, reused" in line]
    assert any("day_0.gz" in line for line in reused) and any("day_1.gz" in line for line in reused)
    assert not any("day_2.gz" in line or "day_3.gz" in line for line in reused)
    assert "day_3.gz (4/4)" in rerun.stderr and "rows/s" in rerun.stderr  # the per-file bar
    assert snapshot(out) == snapshot(reference)
    assert not work.exists()  # removed by the successful run


def test_checkpoints_of_changed_inputs_are_not_reused(days, tmp_path):
    paths, _ = days
    out = tmp_path / "data"
    args = ["--source", "criteo", "--split", "days", "--resume", "--out", str(out),
            "--input", *map(str, paths)]
    killed = cli(*args, env={KILL_AFTER_FILE_ENV: "0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # "a new download"
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "reused" not in rerun.stderr


def test_checkpoints_are_reused_only_while_finished_and_unchanged(days, tmp_path):
    from ctr_ad.ingest.resume import FileCheckpoints, FileResult, StatisticsLog

    paths, _ = days
    out = tmp_path / "data"
    store = FileCheckpoints(out, paths, "key-1")
    folder = store.fresh_folder(0)
    spill, part = folder / "spill-00000-000000.arrow", folder / "quarantine.jsonl"
    spill.write_bytes(b"x")
    part.write_text("")
    log = StatisticsLog(folder / "statistics.pkl")
    for block in ({"counts": 1}, {"counts": 2}):
        log.append(block)
    log.close()
    done = FileResult(spills=[str(spill)], rows_read=7, quarantine=str(part), statistics=str(log.path))
    store.save(0, done)
    assert store.load(0).rows_read == 7 and store.load(1) is None
    # The blocks' statistics come back in block order, one at a time.
    assert list(FileCheckpoints.statistics(store.load(0))) == [{"counts": 1}, {"counts": 2}]
    with pytest.raises(UserError, match=r"another ingest into .* is running"):
        FileCheckpoints(out, paths, "key-1")  # one ingest at a time
    store.invalidate(0)  # pass 2 is about to consume the spills
    assert store.load(0) is None
    store.save(0, done)
    spill.unlink()  # a spill gone: redo the file
    assert store.load(0) is None
    store.close(success=False)
    assert work_dir(out).is_dir()  # kept for the next run
    other = FileCheckpoints(out, paths, "key-2")  # other inputs or options: everything goes
    assert not other.folder(0).exists()
    other.close(success=True)
    assert not work_dir(out).exists()
