"""``ctr-ad ingest --engine ray`` writes the local engine's dataset, byte for byte.

Every test shares one local Ray instance of 2 CPUs (starting one costs 10-30 s on a busy 2-core
machine). ``ray`` is imported directly: CI installs the ``ray`` extra, and a missing Ray must fail
this file, not skip it.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import ray

from ctr_ad.cli import main as cli_main
from ctr_ad.errors import UserError
from ctr_ad.ingest import ray_engine
from ctr_ad.ingest.reader import check_input_file
from ctr_ad.ingest.run import run_ingest
from ctr_ad.synthetic import write_synthetic
from ctr_ad.table_schema import TableSchema

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
CRITEO = DATA / "criteo-kaggle-8k"
VARIANTS = DATA / "criteo-variants"
OBD = DATA / "open-bandit" / "random-all.csv"
OBD_SCHEMA = REPO / "pipelines" / "schemas" / "open-bandit.yaml"
OUTPUTS = ("train.parquet", "valid.parquet", "test.parquet", "features.json", "quarantine.jsonl")


@pytest.fixture(scope="module")
def ray_cpus():
    """One local Ray instance of 2 CPUs for the module; ingests find it initialized and reuse it."""
    assert not ray.is_initialized()
    ray_engine.start_local(2)
    yield int(ray.cluster_resources()["CPU"])
    ray.shutdown()


@pytest.fixture
def submitted(monkeypatch):
    """How many blocks the Ray executor was handed (proof that the work went to Ray tasks)."""
    calls = []
    real = ray_engine.RayExecutor.submit

    def spy(self, fn, /, *args):
        calls.append(fn.__name__)
        return real(self, fn, *args)

    monkeypatch.setattr(ray_engine.RayExecutor, "submit", spy)
    return calls


def both_engines(tmp_path: Path, inputs: list[Path], source: str, **kw) -> tuple[dict, dict]:
    """The same ingest on the local engine (in this process) and on Ray; asserts identical datasets."""
    local = run_ingest(inputs, source, tmp_path / "local", quiet=True, **kw)
    on_ray = run_ingest(inputs, source, tmp_path / "ray", quiet=True, engine="ray", **kw)
    for name in OUTPUTS:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    written = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("local", "ray")]
    assert written == [local, on_ray]
    assert {k: v for k, v in local.items() if k != "run"} == {k: v for k, v in on_ray.items() if k != "run"}
    assert (local["run"]["engine"], on_ray["run"]["engine"]) == ("local", "ray")
    assert "engine" not in on_ray["options"]  # not an option of the data: the fingerprint ignores it
    return local, on_ray


def _with_bad_lines(path: Path, out: Path, every: int) -> tuple[Path, int]:
    lines = path.read_bytes().split(b"\n")[:-1]
    bad = range(5, len(lines), every)
    for i in bad:  # a label that is not 0/1, and a line of too few fields, alternately
        lines[i] = b"7" + lines[i][1:] if i % 2 else lines[i].split(b"\t")[0]
    out.write_bytes(b"\n".join(lines) + b"\n")
    return out, len(bad)


# ------------------------------------------------------------------------------ the real samples
def test_criteo_8k_three_files_with_quarantine(ray_cpus, submitted, tmp_path):
    assert ray_cpus == 2
    train, n_bad = _with_bad_lines(CRITEO / "train.tsv", tmp_path / "train-bad.tsv", every=211)
    inputs = [train, CRITEO / "dev.tsv", CRITEO / "test.tsv"]
    local, _ = both_engines(tmp_path, inputs, "criteo", split="files", block_bytes=64 * 1024, max_bad_fraction=0.05)
    assert local["rows"] == {"read": 8000, "written": 8000 - n_bad, "quarantined": n_bad} and n_bad == 35
    assert local["splits"] == {"train": 7200 - n_bad, "valid": 409, "test": 391}
    # 2 MB in 64 KiB blocks: about 30 blocks a pass, each a Ray task (pass 1, then pass 2).
    assert submitted.count("_parse_count_spill") == submitted.count("_transform_block") >= 25


@pytest.mark.parametrize(("files", "source", "kw"), [
    (["criteo-1k-stripped-trailing.tsv"], "criteo", {"split": "random", "seed": 3}),
    (["kaggle-train-2k-with-id.csv", "criteo-200-header-floats.csv"], "criteo-csv", {"min_count": 1}),
], ids=["stripped-trailing", "kaggle-csv-and-header-floats"])
def test_criteo_variants(ray_cpus, tmp_path, files, source, kw):
    local, _ = both_engines(tmp_path, [VARIANTS / f for f in files], source, block_bytes=32 * 1024, **kw)
    assert local["rows"]["written"] == {1: 1000, 2: 2199}[len(files)]


def test_open_bandit_builtin_source(ray_cpus, tmp_path):
    local, _ = both_engines(tmp_path, [OBD], "obd", split="random", seed=3, block_bytes=1 << 20)
    assert local["rows"] == {"read": 10000, "written": 10000, "quarantined": 0}


def test_open_bandit_declared_schema_time_split_parquet(ray_cpus, submitted, tmp_path):
    """A declared log read from Parquet (blocks are frames), split by time (a third pass on Ray)."""
    parquet = tmp_path / "obd.parquet"
    pl.read_csv(OBD, infer_schema=False).write_parquet(parquet)
    schema = TableSchema.load(OBD_SCHEMA)
    local, _ = both_engines(tmp_path, [parquet], "table", schema=schema, split="time", block_bytes=256 * 2000)
    assert local["rows"]["written"] == 10000 and local["schema"]["label"]["column"] == "click"
    assert submitted.count("_block_time_counts") == submitted.count("_parse_count_spill") == 5


def test_synthetic_200k_rows(ray_cpus, submitted, tmp_path):
    path = tmp_path / "synth.tsv"
    assert write_synthetic(path, 200_000, seed=0) == 200_000  # what `ctr-ad synth --rows 200000` writes
    local, _ = both_engines(tmp_path, [path], "criteo", block_bytes=4 << 20)
    assert local["rows"]["written"] == 200_000
    assert local["splits"] == {"train": 160_000, "valid": 20_000, "test": 20_000}
    assert len(submitted) == 2 * 12  # 48.8 MB in 4 MiB blocks, both passes


# ------------------------------------------------------------------------------ worker state, errors
def test_a_second_ingest_into_the_same_out_gets_fresh_workers(ray_cpus, tmp_path):
    """Ray keeps its worker processes between ingests; the features cached by the first ingest (by its
    staging path, which the second one shares) must not encode the second one's rows."""
    inputs = [CRITEO / "train.tsv"]
    run_ingest(inputs, "criteo", tmp_path / "ray", quiet=True, engine="ray", min_count=1, block_bytes=256 * 1024)
    both_engines(tmp_path, inputs, "criteo", min_count=5, block_bytes=256 * 1024)


def test_task_errors_are_the_tasks_own_exceptions(ray_cpus, tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(UserError) as local:
        check_input_file(missing)
    executor = ray_engine.RayExecutor(workers=1)
    try:
        assert executor.window == 4 and executor.cpus == 2
        with pytest.raises(UserError) as remote:
            executor.submit(check_input_file, missing).result()
        assert str(remote.value) == str(local.value) == f"{missing}: no such file"
        with pytest.raises(FileNotFoundError) as io_error:  # errno and file name survive: one line in the CLI
            executor.submit(Path.read_bytes, missing).result()
        assert (io_error.value.errno, io_error.value.filename) == (2, str(missing))
        assert executor.submit(check_input_file, CRITEO / "dev.tsv").result() is None
    finally:
        executor.shutdown(cancel_futures=True)
    assert ray.is_initialized()  # an instance the executor did not start is left running


def test_a_cluster_without_cpus_is_one_line_after_the_wait(ray_cpus, monkeypatch):
    """A head started with --num-cpus=0 whose workers never join: a clear error, not a run that hangs."""
    monkeypatch.setattr(ray_engine, "WAIT_FOR_CPUS_S", 0.0)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"memory": 1e9})  # what such a cluster reports
    with pytest.raises(UserError, match=r"^the Ray cluster has no CPUs to run the ingest's tasks on \(waited 0 s"):
        ray_engine.RayExecutor(workers=1)
    assert ray.is_initialized()  # not the executor's to shut down


def test_cli_bad_input_is_the_same_one_line_error_on_both_engines(ray_cpus, tmp_path, capsys):
    truncated = tmp_path / "day_0.gz"
    truncated.write_bytes(gzip.compress((CRITEO / "train.tsv").read_bytes())[:200_000])
    errors = {}
    for engine in ("local", "ray"):
        code = cli_main(["ingest", "--engine", engine, "--source", "criteo", "--input", str(truncated),
                         "--out", str(tmp_path / engine), "--quiet"])
        errors[engine] = (code, capsys.readouterr().err)
    assert errors["ray"] == errors["local"]
    code, err = errors["ray"]
    assert code == 2 and err.startswith(f"ctr-ad ingest: error: {truncated}: truncated or corrupt gzip file (")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "ray").exists()


def test_engine_ray_without_ray_installed_says_how_to_install(tmp_path):
    """No Ray to import: one line and exit 2, before any work (no Ray instance is started here)."""
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}
    r = subprocess.run([sys.executable, "-m", "ctr_ad.cli", "ingest", "--engine", "ray", "--source", "criteo",
                        "--input", str(CRITEO / "dev.tsv"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr == ("ctr-ad ingest: error: --engine ray needs Ray, which is not installed here; install it "
                        "with: pip install 'ctr-ad[ray]'\n")
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address_is_one_line_not_minutes_of_retries(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    r = subprocess.run([sys.executable, "-m", "ctr_ad.cli", "ingest", "--engine", "ray", "--source", "criteo",
                        "--input", str(CRITEO / "dev.tsv"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr == (f"ctr-ad ingest: error: RAY_ADDRESS=127.0.0.1:{port}: cannot reach the Ray cluster's head "
                        f"(Connection refused)\n")
    assert not (tmp_path / "out").exists()
