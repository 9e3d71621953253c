"""Training on the real 8k Criteo sample: accuracy, determinism, resume, DDP, loaders, config errors."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
from helpers_train import DEMO_CONFIG, PYTHON, ingested_8k, reseal_manifest, small_config, subprocess_env
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from ctr_ad import checkpoint
from ctr_ad.cli import main as cli_main
from ctr_ad.config import load_config
from ctr_ad.data import MemoryBatches, PlanSpec, StreamBatches, TensorData, load_split
from ctr_ad.errors import UserError
from ctr_ad.features import FeatureProcessor
from ctr_ad.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingested_8k(tmp_path_factory)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------- config
def test_config_errors_name_the_key(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embeding_dim: 8\n")
    with pytest.raises(UserError, match=r"unknown key 'model\.embeding_dim'"):
        load_config(bad)
    with pytest.raises(UserError, match=r"'train\.batch_size'"):
        load_config(DEMO_CONFIG, ["train.batch_size=many"])
    with pytest.raises(UserError, match=r"anti_distillation\.penalty"):
        load_config(None, ["anti_distillation.penalty=nope"])
    cfg = load_config(DEMO_CONFIG, ["model.mlp=[8, 4]", "anti_distillation.lambda=0.5", "train.grad_clip=null"])
    assert cfg.model.mlp == [8, 4] and cfg.anti_distillation.lam == 0.5 and cfg.train.grad_clip is None
    assert cfg.to_dict()["anti_distillation"]["lambda"] == 0.5

    out = tmp_path / "run"
    code = cli_main(["train", "--data", str(data_dir), "--config", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown key 'model.embeding_dim'" in err and "Traceback" not in err
    code = cli_main(["train", "--data", str(data_dir), "--out", str(out), "--set", "model.components=two"])
    assert code == 2 and "'model.components'" in capsys.readouterr().err
    code = cli_main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert code == 2 and "nowhere" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- accuracy
def logistic_regression_auc(data_dir: Path) -> float:
    """scikit-learn's LogisticRegression (default C) on one-hot categorical indices + dense columns."""
    fp = FeatureProcessor.load(data_dir / "features.json")
    train_df = pl.read_parquet(data_dir / "train.parquet")
    test_df = pl.read_parquet(data_dir / "test.parquet")
    enc = OneHotEncoder(handle_unknown="ignore")

    def design(frame: pl.DataFrame, fit: bool) -> sp.csr_matrix:
        cat = frame.select(fp.categorical_columns).to_numpy()
        onehot = enc.fit_transform(cat) if fit else enc.transform(cat)
        return sp.hstack([onehot, sp.csr_matrix(frame.select(fp.dense_columns).to_numpy())]).tocsr()

    lr = LogisticRegression(max_iter=2000, solver="liblinear")
    lr.fit(design(train_df, True), train_df["label"].to_numpy())
    return float(roc_auc_score(test_df["label"].to_numpy(), lr.predict_proba(design(test_df, False))[:, 1]))


def test_demo_ensemble_matches_logistic_regression(tmp_path: Path, data_dir: Path) -> None:
    result = train(data_dir, load_config(DEMO_CONFIG, ["train.progress=false"]), tmp_path / "run", log=False)
    baseline = logistic_regression_auc(data_dir)
    assert result.test_metrics is not None
    assert result.test_metrics["auc"] >= baseline - 0.01, (result.test_metrics, baseline)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "train_loss", "valid_logloss", "valid_auc", "examples_per_s"} <= lines[0].keys()
    # Early stopping restored the best evaluation's weights.
    assert result.valid_metrics["logloss"] == min(x["valid_logloss"] for x in lines)


# ----------------------------------------------------------------------------------------- determinism
def test_deterministic_runs_are_bit_identical(tmp_path: Path, data_dir: Path) -> None:
    cfg = small_config(
        anti_distillation__penalty="output_decorrelation",
        anti_distillation__lambda=0.1,
        anti_distillation__penalty_batch_size=128,
        train__grad_clip=1.0,
    )
    a = train(data_dir, cfg, tmp_path / "a", deterministic=True, log=False)
    b = train(data_dir, cfg, tmp_path / "b", deterministic=True, log=False)
    assert state_equal(a.model, b.model)
    assert a.valid_metrics == b.valid_metrics
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train_penalty"] > 0 for m in metrics)  # the penalty was computed on shared rows
    # Another data seed gives another model (the seeds are really used).
    c = train(data_dir, small_config(train__seed_data=1), tmp_path / "c", deterministic=True, log=False)
    assert not state_equal(a.model, c.model)


# ----------------------------------------------------------------------------------------- resume
RESUME_SETS = [
    "model.components=2",
    "model.embedding_dim=4",
    "model.mlp=[16]",
    "train.batch_size=64",
    "train.epochs=4",
    "train.eval_every_steps=40",
    "train.checkpoint_every_steps=7",  # not a divisor of the 113 steps/epoch: checkpoints mid-epoch
    "train.early_stopping_patience=null",
    "train.threads=1",
    "train.progress=false",
]


def train_cmd(data_dir: Path, out: Path, *extra: str) -> list[str]:
    sets = [arg for s in RESUME_SETS for arg in ("--set", s)]
    return [
        PYTHON,
        "-m",
        "ctr_ad.cli",
        "train",
        "--data",
        str(data_dir),
        "--config",
        str(DEMO_CONFIG),
        "--out",
        str(out),
        "--deterministic",
        "--no-progress",
        *sets,
        *extra,
    ]


def kill_after_checkpoint(cmd: list[str], run_dir: Path, sig: int, min_evals: int = 1) -> tuple[int, bytes]:
    """Start a training subprocess, send ``sig`` once it has evaluated and checkpointed; (rc, stderr)."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics, ckpt = run_dir / "metrics.jsonl", run_dir / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= min_evals:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path, data_dir: Path) -> None:
    cfg = load_config(DEMO_CONFIG, RESUME_SETS)
    full = train(data_dir, cfg, tmp_path / "full", deterministic=True, log=False)

    run_dir = tmp_path / "killed"
    rc, _ = kill_after_checkpoint(train_cmd(data_dir, run_dir), run_dir, signal.SIGKILL)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt = checkpoint.load(run_dir / "checkpoint.pt")
    assert 0 < ckpt["state"]["step"] < full.steps and ckpt["state"]["step_in_epoch"] > 0  # mid-epoch
    assert not (run_dir / "bundle").exists()

    resumed = train(data_dir, cfg, run_dir, resume=True, deterministic=True, log=False)
    assert resumed.steps == full.steps
    assert state_equal(full.model, resumed.model)
    strip = lambda p: [  # noqa: E731 - wall-clock fields differ
        {k: v for k, v in json.loads(x).items() if k != "examples_per_s"} for x in p.read_text().splitlines()
    ]
    assert strip(run_dir / "metrics.jsonl") == strip(tmp_path / "full" / "metrics.jsonl")


def test_sigterm_writes_checkpoint_then_resume_finishes(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "term"
    rc, err = kill_after_checkpoint(train_cmd(data_dir, run_dir), run_dir, signal.SIGTERM)
    assert rc == 143, err.decode()[-2000:]
    assert b"--resume" in err
    cfg = load_config(DEMO_CONFIG, RESUME_SETS)
    # Without resume the run directory is refused rather than overwritten.
    with pytest.raises(UserError, match="--resume"):
        train(data_dir, cfg, run_dir, deterministic=True, log=False)
    # A changed config is refused on resume: it would not be the same run.
    with pytest.raises(UserError, match=r"train\.lr"):
        train(
            data_dir,
            load_config(DEMO_CONFIG, [*RESUME_SETS, "train.lr=0.01"]),
            run_dir,
            resume=True,
            log=False,
        )
    done = train(data_dir, cfg, run_dir, resume=True, deterministic=True, log=False)
    assert done.bundle_dir is not None and (done.bundle_dir / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------- DDP
def test_ddp_gloo_two_processes_match_single_process(tmp_path: Path, data_dir: Path) -> None:
    sets = [
        "model.components=2",
        "model.embedding_dim=4",
        "model.mlp=[16]",
        "model.dropout=0.0",
        "train.batch_size=500",
        "train.epochs=1",
        "train.embedding_optimizer=adam",
        "train.early_stopping_patience=null",
        "train.progress=false",
        "train.threads=1",
    ]
    single = train(data_dir, load_config(DEMO_CONFIG, sets), tmp_path / "single", log=False)
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ctr_ad.cli",
        "train",
        "--data",
        str(data_dir),
        "--config",
        str(DEMO_CONFIG),
        "--out",
        str(tmp_path / "ddp"),
        "--device",
        "cpu",
        "--no-progress",
        *[arg for s in sets for arg in ("--set", s)],
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    from safetensors.torch import load_file

    ddp = load_file(str(tmp_path / "ddp" / "bundle" / "model.safetensors"))
    meta = json.loads((tmp_path / "ddp" / "bundle" / "metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == single.steps
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp[key], value, atol=2e-4, rtol=1e-3, msg=key)


# ----------------------------------------------------------------------------------------- data plans
def id_data(n: int) -> TensorData:
    """Rows whose dense column holds their own index, to check which rows a plan visits."""
    return TensorData(
        torch.zeros(n, 1, dtype=torch.long), torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n)
    )


@pytest.mark.parametrize("independent", [False, True])
def test_memory_plan_visits_every_row_once_and_shards_cover_the_batch(independent: bool) -> None:
    n, k = 103, 3
    spec = PlanSpec(batch_size=10, components=k, independent=independent, penalty_batch_size=8, seed=5)
    plan = MemoryBatches(id_data(n), spec)
    batches = list(plan.batches(epoch=0))
    assert len(batches) == plan.steps_per_epoch == 11
    ids = torch.cat([b.dense[..., 0] for b in batches], dim=-1)
    rows = ids if independent else ids[None]
    for r in rows:
        assert sorted(r.long().tolist()) == list(range(n))
    if independent:
        assert not torch.equal(rows[0], rows[1])  # each component its own order
        assert batches[0].penalty is not None and batches[0].penalty.dense.shape == (8, 1)
    # Resuming at step 4 regenerates the same remaining batches.
    rest = list(plan.batches(epoch=0, start_step=4))
    assert len(rest) == len(batches) - 4 == 7
    assert all(torch.equal(x.dense, y.dense) for x, y in zip(rest, batches[4:], strict=True))
    # Two DDP ranks take complementary shards of every global batch.
    shards = [
        list(MemoryBatches(id_data(n), PlanSpec(10, k, independent, 8, 5, rank=r, world=2)).batches(0))
        for r in range(2)
    ]
    assert [len(s) for s in shards] == [len(batches)] * 2
    for full, a, b in zip(batches, *shards, strict=True):
        assert torch.equal(torch.cat([a.dense, b.dense], dim=-2), full.dense)
        assert a.global_rows == full.global_rows


def test_stream_loader_reads_row_groups_and_matches_memory(tmp_path: Path, data_dir: Path) -> None:
    fp = FeatureProcessor.load(data_dir / "features.json")
    cats, dense = fp.categorical_columns, fp.dense_columns
    path = tmp_path / "train.parquet"
    pq.write_table(pq.read_table(data_dir / "train.parquet"), path, row_group_size=700)
    assert pq.ParquetFile(path).metadata.num_row_groups > 5
    spec = PlanSpec(batch_size=256, components=2, independent=True, penalty_batch_size=None, seed=3)
    memory = MemoryBatches(load_split(path, cats, dense), spec)
    # One buffer holding the whole file gives exactly the memory loader's batches.
    whole = StreamBatches(path, cats, dense, spec, buffer_rows=10**9)
    for x, y in zip(memory.batches(1), whole.batches(1), strict=True):
        assert torch.equal(x.cat, y.cat) and torch.equal(x.label, y.label)
    # Small buffers: every row still seen once per epoch per component, and resume skips correctly.
    small = StreamBatches(path, cats, dense, spec, buffer_rows=1500)
    batches = list(small.batches(0))
    assert len(batches) == small.steps_per_epoch and len(small.buffers) > 1
    assert sum(b.label.shape[-1] for b in batches) == memory.rows
    tail = list(small.batches(0, start_step=7))
    assert all(torch.equal(x.cat, y.cat) for x, y in zip(tail, batches[7:], strict=True))


def test_stream_loader_trains(tmp_path: Path, data_dir: Path) -> None:
    stream_dir = tmp_path / "data"
    shutil.copytree(data_dir, stream_dir)
    pq.write_table(pq.read_table(data_dir / "train.parquet"), stream_dir / "train.parquet", row_group_size=1000)
    reseal_manifest(stream_dir)
    cfg = small_config(data__loader="stream", data__stream_buffer_rows=2500, data__eval_batch_size=100)
    result = train(stream_dir, cfg, tmp_path / "run", log=False)
    assert result.test_metrics is not None and math.isfinite(result.test_metrics["logloss"])
    assert result.test_metrics["auc"] > 0.6
    assert np.isfinite(result.valid_metrics["logloss"])
