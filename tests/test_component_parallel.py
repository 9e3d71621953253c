"""Component parallelism (``train.parallelism: component``) under torchrun/gloo equals one process.

Every torchrun launch trains several configs (tests/component_parallel_driver.py) through the CLI;
each is compared with the same config trained in this process: final weights (the bundle) and test
predictions within float tolerance. K = 4 on 2 ranks (2 components each) and on 4 ranks (1 each),
SparseAdam, with and without an anti-distillation penalty (the penalty's all-gather of logits, the
gradient-ratio λ and the clipped global norm all cross ranks); K = 2 on 4 ranks puts two ranks in each
component group (data parallelism inside the group, sparse gradients synced by all-gather).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_train import DEMO_CONFIG, PYTHON, ingested_8k, subprocess_env
from safetensors.torch import load_file

from ctr_ad import bundle as bundle_mod
from ctr_ad import checkpoint as ckpt
from ctr_ad.component_parallel import ComponentShards, layout_for
from ctr_ad.config import load_config
from ctr_ad.data import load_split
from ctr_ad.evaluation import evaluate
from ctr_ad.train import TrainResult, train

DRIVER = Path(__file__).with_name("component_parallel_driver.py")
BASE = [
    "model.embedding_dim=4",
    "model.mlp=[16]",
    "model.dropout=0.0",  # dropout masks are drawn per rank: equal in distribution only
    "model.anchor=none",
    "train.batch_size=600",
    "train.epochs=2",
    "train.max_steps=16",
    "train.eval_every_steps=8",
    "train.embedding_optimizer=sparse_adam",
    "train.early_stopping_patience=null",
    "train.weight_averaging_epochs=0.5",
    "train.progress=false",
    "train.threads=1",
]
CONFIGS = {
    "plain": ["model.components=4"],
    "penalty": [
        "model.components=4",
        "anti_distillation.penalty=negative_correlation",  # λ on the gradient-ratio scale
        "anti_distillation.penalty_batch_size=301",  # odd: uneven shards inside a component group
        "train.grad_clip=0.5",
    ],
    "groups": [
        "model.components=2",
        "anti_distillation.penalty=negative_correlation",
        "anti_distillation.lambda=0.5",
        "anti_distillation.penalty_batch_size=301",
    ],
}
WORLDS = {2: ["plain", "penalty"], 4: ["plain", "penalty", "groups"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingested_8k(tmp_path_factory)


@pytest.fixture(scope="module")
def single(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    out = tmp_path_factory.mktemp("single")
    return {
        name: train(data_dir, load_config(DEMO_CONFIG, BASE + sets), out / name, device="cpu", log=False)
        for name, sets in CONFIGS.items()
    }


def launch(world: int, data_dir: Path, out: Path, resume: Path | None = None) -> None:
    """Train every config of ``world`` in one torchrun launch; ``resume``: also resume that run."""
    runs = []
    for name in WORLDS[world]:
        sets = [*BASE, *CONFIGS[name], "train.parallelism=component"]
        runs.append(
            [
                "train",
                "--data",
                str(data_dir),
                "--config",
                str(DEMO_CONFIG),
                "--out",
                str(out / name),
                "--device",
                "cpu",
                *[a for s in sets for a in ("--set", s)],
            ]
        )
    if resume is not None:
        runs.append(
            [
                "train",
                "--data",
                str(data_dir),
                "--out",
                str(resume),
                "--resume",
                "--device",
                "cpu",
                "--config",
                str(resume / "config.yaml"),
                "--set",
                "train.parallelism=component",
            ]
        )
    spec = out / "runs.json"
    spec.write_text(json.dumps(runs))
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(world),
        str(DRIVER),
        str(spec),
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    # One summary line per run, from rank 0 (the rank that wrote the bundle).
    summaries = [json.loads(ln) for ln in proc.stdout.decode().splitlines() if ln.startswith("{")]
    assert [Path(x["bundle"]).parent for x in summaries] == [Path(r[r.index("--out") + 1]) for r in runs]


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_component_parallel_equals_single_process(
    world: int, data_dir: Path, single: dict[str, TrainResult], tmp_path: Path
) -> None:
    # A finished single-process run resumed component-parallel: every rank restores its slice of
    # the checkpoint (weights, best weights, optimizer moments, averages) and the ranks rebuild the
    # same bundle from it.
    resumed = tmp_path / "resumed"
    shutil.copytree(single["penalty"].run_dir, resumed)
    shutil.rmtree(resumed / "bundle")
    launch(world, data_dir, tmp_path, resume=resumed)
    again = load_file(str(resumed / "bundle" / "model.safetensors"))
    for key, value in single["penalty"].model.state_dict().items():
        torch.testing.assert_close(again[key], value.cpu(), atol=1e-6, rtol=1e-6, msg=f"resumed {key}")
    assert json.loads((resumed / "bundle" / "metadata.json").read_text())["world_size"] == world
    test_split = load_split(data_dir / "test.parquet", *_columns(data_dir))
    for name in WORLDS[world]:
        ref = single[name]
        bundle_dir = tmp_path / name / "bundle"
        meta = json.loads((bundle_dir / "metadata.json").read_text())
        assert meta["world_size"] == world and meta["steps"] == ref.steps == 16
        assert meta["best_step"] == ref.best_step
        weights = load_file(str(bundle_dir / "model.safetensors"))
        state = ref.model.state_dict()
        assert weights.keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(weights[key], value.cpu(), atol=1e-5, rtol=1e-4, msg=f"{name} {key}")
        # Test predictions of the bundle the ranks wrote against the single process's.
        loaded = bundle_mod.load(bundle_dir)
        ev = evaluate(loaded.model, test_split, *_columns(data_dir), loaded.config, torch.device("cpu"))
        assert ref.test is not None and ev.logits.shape == ref.test.logits.shape
        np.testing.assert_allclose(ev.logits, ref.test.logits, atol=1e-4, rtol=1e-4, err_msg=name)
        # metrics.jsonl: the losses the ranks log are the whole ensemble's, as one process logs them.
        cp_log = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        ref_log = [json.loads(ln) for ln in (ref.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in cp_log] == [r["step"] for r in ref_log] == [8, 16]
        for a, b in zip(cp_log, ref_log, strict=True):
            for key in ("train_loss", "train_bce", "train_penalty", "valid_logloss", "valid_auc"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, key)
        # The final checkpoint holds the whole ensemble, optimizer moments and averages included,
        # exactly as one process writes it (so either can resume it).
        got, want = ckpt.load(tmp_path / name / "checkpoint.pt"), ckpt.load(ref.run_dir / "checkpoint.pt")
        assert_nested_close(got["state"], want["state"], f"{name} state")
        assert_nested_close(got["model"], want["model"], f"{name} model")
        assert_nested_close(got["best_model"], want["best_model"], f"{name} best_model")
        assert_nested_close(got["averager"], want["averager"], f"{name} averager")
        assert_nested_close(got["optimizers"], want["optimizers"], f"{name} optimizers")
    # The penalty moved the weights: the plain and penalised runs differ (the test can fail).
    if "penalty" in WORLDS[world]:
        a = single["plain"].model.state_dict()["weights.0"]
        b = single["penalty"].model.state_dict()["weights.0"]
        assert not torch.allclose(a, b, atol=1e-4)


def assert_nested_close(got: object, want: object, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_nested_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_nested_close(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=where)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9, nan_ok=True), where
    else:
        assert got == want, where


@pytest.mark.parametrize(("k", "world"), [(4, 2), (4, 4), (2, 4), (4, 6), (6, 4), (4, 3)])
def test_component_slices_tile_the_ensemble(k: int, world: int) -> None:
    """The slices of the ranks that lead each component group, in group order, rebuild every tensor
    of a checkpoint (weights, optimizer moments, averages); step counts stay whole."""
    rows = 5
    full_param = torch.arange(k * rows * 3, dtype=torch.float32).reshape(k * rows, 3)
    optimizer = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": full_param * 2}}, "param_groups": [{"lr": 1}]}
    layouts = [layout_for(k, world, r) for r in range(world)]
    assert all(lay.groups * lay.count == k and lay.groups * lay.group_size == world for lay in layouts)
    leaders = [lay for lay in layouts if lay.group_rank == 0]
    assert [lay.first for lay in leaders] == list(range(0, k, leaders[0].count))
    parts, moments = [], []
    for lay in leaders:
        shards = ComponentShards(lay, torch.device("cpu"), ["embedding.weight"])
        state = shards.slice_state({"embedding.weight": full_param, "anchor_bias": torch.ones(1)})
        assert torch.equal(state["anchor_bias"], torch.ones(1))  # shared buffers are not split
        parts.append(state["embedding.weight"])
        sliced = shards.slice_optimizer(optimizer)
        assert sliced["state"][0]["step"] == 7 and sliced["param_groups"] == optimizer["param_groups"]
        moments.append(sliced["state"][0]["exp_avg"])
    assert torch.equal(torch.cat(parts), full_param)
    assert torch.equal(torch.cat(moments), full_param * 2)


def _columns(data_dir: Path) -> tuple[list[str], list[str]]:
    from ctr_ad.features import FeatureProcessor

    fp = FeatureProcessor.load(data_dir / "features.json")
    return list(fp.categorical_columns), list(fp.dense_columns)
