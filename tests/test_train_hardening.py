"""Training cannot be poisoned: divergence stops the run, NaN weights never reach a bundle or a
prediction, checkpoints are written at evaluations and refused when damaged or tampered with."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from helpers_train import (
    CRITEO_8K,
    DEMO_CONFIG,
    PYTHON,
    ingested_8k,
    reseal_manifest,
    small_config,
    subprocess_env,
)
from safetensors.torch import load_file, save_file

from ctr_ad import checkpoint
from ctr_ad.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingested_8k(tmp_path_factory)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "ctr_ad.cli", *args], env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def train_args(data_dir: Path, out: Path, *sets: str) -> list[str]:
    base = ["model.components=2", "model.mlp=[16]", "train.epochs=2", "train.threads=1", *sets]
    return ["train", "--data", str(data_dir), "--config", str(DEMO_CONFIG), "--out", str(out), "--no-progress",
            *[a for s in base for a in ("--set", s)]]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


# ----------------------------------------------------------------------------------------- divergence
def test_divergent_learning_rate_stops_with_a_clear_error_and_no_bundle(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = cli(*train_args(data_dir, out, "train.lr=1e6", "train.embedding_lr=1e6"))
    assert_one_line_error(proc, "diverged", "train.lr=1e+06")
    assert not (out / "bundle").exists()


def rewrite_bundle_weights(bundle: Path, change) -> None:
    state = load_file(str(bundle / "model.safetensors"))
    change(state)
    save_file(state, str(bundle / "model.safetensors"))
    sums = [f"{hashlib.sha256((bundle / n).read_bytes()).hexdigest()}  {n}\n"
            for n in ("model.safetensors", "features.json", "config.yaml", "metadata.json")]
    (bundle / "checksums.sha256").write_text("".join(sums))


def test_predict_refuses_a_bundle_with_nan_weights(data_dir: Path, tmp_path: Path) -> None:
    result = train(data_dir, small_config(), tmp_path / "run", log=False)
    assert result.bundle_dir is not None
    rewrite_bundle_weights(result.bundle_dir, lambda s: s["weights.0"].view(-1)[:5].fill_(float("nan")))
    preds = tmp_path / "p.parquet"
    proc = cli("predict", "--bundle", str(tmp_path / "run"), "--source", "criteo",
               "--input", str(CRITEO_8K / "test.tsv"), "--out", str(preds))
    assert_one_line_error(proc, "non-finite", "weights.0")
    assert not preds.exists()


def test_one_class_training_data_warns_and_json_output_has_no_bare_nan(data_dir: Path, tmp_path: Path) -> None:
    one_class = tmp_path / "data"
    shutil.copytree(data_dir, one_class)
    for split in ("train", "valid", "test"):
        path = one_class / f"{split}.parquet"
        pl.read_parquet(path).with_columns(pl.lit(0.0, pl.Float32).alias("label")).write_parquet(path)
    reseal_manifest(one_class)
    proc = cli(*train_args(one_class, tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "every label is 0" in proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1], parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert summary["valid"]["auc"] is None  # undefined with one class: null, never NaN
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_is_written_at_each_evaluation_by_default(data_dir: Path, tmp_path: Path) -> None:
    """checkpoint_every_steps = 0 means 'at evaluations': a kill -9 after the first one loses little."""
    out = tmp_path / "run"
    args = train_args(data_dir, out, "train.epochs=500", "train.early_stopping_patience=null",
                      "train.checkpoint_every_steps=0")
    proc = subprocess.Popen([PYTHON, "-m", "ctr_ad.cli", *args], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before two evaluations: the test proves nothing"
        time.sleep(0.05)  # the checkpoint follows its evaluation within the same step
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = checkpoint.load(out / "checkpoint.pt")["state"]
    assert state["step"] >= 29 and state["last_eval_step"] == state["step"]  # saved right at an evaluation


@pytest.fixture(scope="module")
def finished_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    proc = cli(*train_args(data_dir, out))
    assert proc.returncode == 0, proc.stderr
    return out


def resume_with(
    finished_run: Path, data_dir: Path, tmp_path: Path, damage
) -> tuple[subprocess.CompletedProcess[str], Path]:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "bundle")
    path = run / "checkpoint.pt"
    path.write_bytes(damage(path.read_bytes()))
    return cli(*train_args(data_dir, run), "--resume"), run


def flip_low_bits(raw: bytes) -> bytes:
    """Flip the lowest mantissa bit of 200 float32 values deep inside the payload (a silent corruption)."""
    data = bytearray(raw)
    start = len(data) // 2
    for i in range(200):
        data[start + 4 * i] ^= 0x01
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "damage", "needle"),
    [
        ("flipped bits", flip_low_bits, "checksum mismatch"),
        ("truncated", lambda raw: raw[: len(raw) // 3], "checksum mismatch"),
        ("empty", lambda raw: b"", "not a ctr-ad checkpoint"),
        ("random bytes", lambda raw: bytes(range(256)) * 40, "not a ctr-ad checkpoint"),
    ],
)
def test_damaged_checkpoint_is_refused_in_one_line(
    finished_run: Path, data_dir: Path, tmp_path: Path, name: str, damage, needle: str
) -> None:
    proc, run = resume_with(finished_run, data_dir, tmp_path, damage)
    assert_one_line_error(proc, "checkpoint.pt", needle)
    assert not (run / "bundle").exists()


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_checkpoint_cannot_run_code(finished_run: Path, data_dir: Path, tmp_path: Path) -> None:
    """A payload with a valid checksum that would call a function when unpickled is refused unrun."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "x": _Exploit(marker)}, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    payload = buffer.getvalue()
    forged = checkpoint.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    proc, _ = resume_with(finished_run, data_dir, tmp_path, lambda raw: forged)
    assert_one_line_error(proc, "checkpoint.pt", "unreadable checkpoint payload")
    assert not marker.exists()


def test_intact_checkpoint_resumes_a_finished_run_to_the_same_bundle(
    finished_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    proc, run = resume_with(finished_run, data_dir, tmp_path, lambda raw: raw)
    assert proc.returncode == 0, proc.stderr
    assert (run / "bundle" / "model.safetensors").read_bytes() == (
        finished_run / "bundle" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda d: (d / "valid.parquet").write_bytes((d / "valid.parquet").read_bytes()[:-10]), "does not match"),
    ],
    ids=["no manifest", "truncated split"],
)
def test_train_and_experiment_refuse_an_incomplete_or_altered_dataset(
    data_dir: Path, tmp_path: Path, damage, needle: str
) -> None:
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    damage(broken)
    assert_one_line_error(cli(*train_args(broken, tmp_path / "run")), needle)
    assert not (tmp_path / "run" / "bundle").exists()
    exp = cli("experiment", "--data", str(broken), "--config", str(DEMO_CONFIG.parent / "experiment-demo.yaml"),
              "--out", str(tmp_path / "exp"))
    assert_one_line_error(exp, needle)
