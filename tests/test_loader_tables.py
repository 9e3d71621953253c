"""The loader that keeps the device busy (prefetch, per-component stream orders) and bounded tables
(hash buckets, the memory check, one embedding table shared by the components)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from helpers_train import CRITEO_8K, DEMO_CONFIG, ingested_8k, reseal_manifest, small_config

from ctr_ad import bundle as bundle_mod
from ctr_ad import checkpoint
from ctr_ad import train as train_mod
from ctr_ad.cli import main as cli_main
from ctr_ad.config import DataConfig, load_config
from ctr_ad.data import Batch, MemoryBatches, PlanSpec, StreamBatches, TensorData
from ctr_ad.errors import UserError
from ctr_ad.memory import LIMIT_ENV, estimate_memory
from ctr_ad.model import EnsembleCTR, hashed_index
from ctr_ad.optim import build_optimizers
from ctr_ad.prefetch import PrefetchedBatches
from ctr_ad.train import TrainingInterrupted, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingested_8k(tmp_path_factory)


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    def parts(x: Batch) -> list[torch.Tensor]:
        pen = [x.penalty.cat, x.penalty.dense, x.penalty.label] if x.penalty is not None else []
        return [x.cat, x.dense, x.label, *pen]

    return len(a) == len(b) and all(
        x.step_in_epoch == y.step_in_epoch and x.global_rows == y.global_rows
        and all(torch.equal(p, q) for p, q in zip(parts(x), parts(y), strict=True))
        for x, y in zip(a, b, strict=True)
    )


def id_frame(n: int) -> pl.DataFrame:
    """Rows whose dense column holds their own index (to see which rows a loader visits)."""
    ids = np.arange(n)
    return pl.DataFrame({"label": (ids % 2).astype(np.float32), "c0": (ids % 7).astype(np.int32),
                         "d0": ids.astype(np.float32)})


# ----------------------------------------------------------------------------------------- prefetch
def test_prefetch_gives_the_same_batches_in_the_same_order() -> None:
    frame = id_frame(1003)
    data = TensorData(torch.tensor(frame["c0"].to_numpy(), dtype=torch.long)[:, None],
                      torch.tensor(frame["d0"].to_numpy())[:, None], torch.tensor(frame["label"].to_numpy()))
    plan = MemoryBatches(data, PlanSpec(batch_size=64, components=3, independent=True, penalty_batch_size=40, seed=9))
    plain = list(plan.batches(epoch=2))
    for depth in (1, 3):
        prefetched = PrefetchedBatches(plan, depth)
        assert prefetched.steps_per_epoch == plan.steps_per_epoch == len(plain) == 16
        assert same_batches(list(prefetched.batches(epoch=2)), plain)
        assert same_batches(list(prefetched.batches(epoch=2, start_step=5)), plain[5:])  # resume
    # By default a thread prefetches on CUDA and for the stream loader, not for the CPU memory loader.
    assert [DataConfig().prefetch_depth("cpu"), DataConfig().prefetch_depth("cuda")] == [0, 2]
    assert DataConfig(loader="stream").prefetch_depth("cpu") == 2
    assert DataConfig(prefetch_batches=0).prefetch_depth("cuda") == 0
    # Leaving the loop early stops the thread; an error in the loader is raised in the training loop.
    before = threading.active_count()
    for i, _ in enumerate(PrefetchedBatches(plan, 2).batches(0)):
        if i == 2:
            break
    assert threading.active_count() == before

    class Broken:
        rows, steps_per_epoch = 10, 3

        def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
            yield plain[0]
            raise UserError("train.parquet: row group 3 is corrupt")

    seen = []
    with pytest.raises(UserError, match="row group 3"):
        for batch in PrefetchedBatches(Broken(), 2).batches(0):
            seen.append(batch)
    assert len(seen) == 1 and threading.active_count() == before


# ----------------------------------------------------------------------------------------- stream orders
def stream_plan(path: Path, seed: int, independent: bool = True, rank: int = 0, world: int = 1) -> StreamBatches:
    spec = PlanSpec(batch_size=64, components=3, independent=independent, penalty_batch_size=48 if independent
                    else None, seed=seed, rank=rank, world=world)
    return StreamBatches(path, ["c0"], ["d0"], spec, buffer_rows=100)


def test_stream_loader_gives_each_component_its_own_buffer_order(tmp_path: Path) -> None:
    n = 1050
    path = tmp_path / "train.parquet"
    pq.write_table(id_frame(n).to_arrow(), path, row_group_size=100)  # 11 buffers of 100 (the last 50)
    plan = stream_plan(path, seed=4)
    batches = list(plan.batches(epoch=1))
    assert len(plan.buffers) == 11 and len(batches) == plan.steps_per_epoch == 17  # ceil(1050 / 64)
    assert [b.global_rows for b in batches] == [64] * 16 + [26]
    ids = torch.cat([b.dense[..., 0] for b in batches], dim=-1).long()  # [K, N]
    for component in ids:  # every row exactly once per component and epoch
        assert sorted(component.tolist()) == list(range(n))
    # Buffer orders (the row group of each row, in the order first visited) differ between components.
    visits = [list(dict.fromkeys((component // 100).tolist())) for component in ids]
    assert len({tuple(v) for v in visits}) == 3
    # The shared order kept by today's plan visits one buffer at a time for every component.
    shared = list(stream_plan(path, seed=4, independent=False).batches(epoch=1))
    assert all(len(set((b.dense[..., 0].long() // 100).tolist())) == 1 for b in shared)
    # The penalty batch has its own stream (another order than every component's).
    pen = torch.cat([b.penalty.dense[:, 0] for b in batches if b.penalty is not None]).long()
    assert pen.shape == (17 * 48,) and len(set(pen.tolist())) == 17 * 48  # 816 < n rows: no repeat yet
    pen_visits = list(dict.fromkeys((pen // 100).tolist()))
    assert all(pen_visits != v[: len(pen_visits)] for v in visits)

    # A pure function of the seeds: a fresh loader gives the same batches, a resume the same tail;
    # another seed other orders.
    assert same_batches(list(stream_plan(path, seed=4).batches(epoch=1)), batches)
    assert same_batches(list(stream_plan(path, seed=4).batches(epoch=1, start_step=7)), batches[7:])
    assert not torch.equal(next(iter(stream_plan(path, seed=5).batches(epoch=1))).dense, batches[0].dense)
    assert not torch.equal(next(iter(plan.batches(epoch=2))).dense, batches[0].dense)
    # Two ranks take complementary shards of every global batch.
    shards = [list(stream_plan(path, seed=4, rank=r, world=2).batches(epoch=1)) for r in range(2)]
    for full, a, b in zip(batches, *shards, strict=True):
        assert torch.equal(torch.cat([a.dense, b.dense], dim=-2), full.dense)
        assert torch.equal(torch.cat([a.penalty.dense, b.penalty.dense]), full.penalty.dense)


def stream_data(data_dir: Path, tmp_path: Path) -> Path:
    """The 8k sample with row groups of 1000 rows (train split re-written, manifest resealed)."""
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    pq.write_table(pq.read_table(data_dir / "train.parquet"), out / "train.parquet", row_group_size=1000)
    reseal_manifest(out)
    return out


def test_interrupted_stream_run_with_per_component_orders_resumes_exactly(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = stream_data(data_dir, tmp_path)
    sets = dict(
        data__loader="stream", data__stream_buffer_rows=2500, anti_distillation__data_order="independent",
        anti_distillation__penalty="output_decorrelation", anti_distillation__lambda=0.1,
        anti_distillation__penalty_batch_size=128, train__eval_every_steps=10, train__threads=1,
    )
    cfg = small_config(**sets)
    full = train(data, cfg, tmp_path / "full", deterministic=True, log=False)

    class TermAfter20Steps:
        """SIGTERM as the training loop sees it, arriving during step 20 (mid-epoch: 15 steps/epoch)."""

        checks = 0

        def __enter__(self) -> TermAfter20Steps:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        @property
        def raised(self) -> bool:
            TermAfter20Steps.checks += 1
            return TermAfter20Steps.checks == 20

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "_SigtermFlag", TermAfter20Steps)
        with pytest.raises(TrainingInterrupted):
            train(data, cfg, tmp_path / "cut", deterministic=True, log=False)
    state = checkpoint.load(tmp_path / "cut" / "checkpoint.pt")["state"]
    assert (state["step"], state["step_in_epoch"]) == (20, 5)
    resumed = train(data, cfg, tmp_path / "cut", resume=True, deterministic=True, log=False)
    assert resumed.steps == full.steps == 30
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    # Prefetch does not change the run: the same weights without the background thread.
    off = train(data, small_config(**sets, data__prefetch_batches=0), tmp_path / "off", deterministic=True,
                log=False)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, off.model.state_dict()[key]), key


# ----------------------------------------------------------------------------------------- hash buckets
def test_hash_is_a_fixed_function_of_the_index() -> None:
    index = torch.tensor([[0, 1, 2, 3, 1000, 2**40]]).T.expand(6, 2)
    rows = hashed_index(index, torch.tensor([10, 0]))
    # Fixed values: a bundle trained anywhere must map an index to the same row in every process.
    assert rows[:, 0].tolist() == [0, 1, 10, 5, 6, 6]
    assert rows[:, 1].tolist() == index[:, 1].tolist()  # an unhashed field passes through


def test_hash_buckets_bound_the_tables_and_bundles_predict_consistently(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = small_config(model__hash_buckets="{C3: 50, C24: 100}", train__epochs=1)
    result = train(data_dir, cfg, tmp_path / "run", log=False)
    fields = result.model.cardinalities
    names = json.loads((data_dir / "features.json").read_text())["categorical"]
    rows = dict(zip(names, result.model.table_rows, strict=True))
    assert rows["C3"] == 52 and rows["C24"] == 102 and rows["C1"] == fields[0]  # 2 reserved rows + N
    assert fields[names.index("C3")] > 52 and fields[names.index("C24")] > 102  # both bounded by hashing
    bundle = bundle_mod.load(result.run_dir)
    assert bundle.model.embedding.weight.shape == (2 * sum(rows.values()), 4)
    assert bundle.metadata["embedding_table_rows"] == result.model.table_rows
    test = pl.read_parquet(data_dir / "test.parquet")
    pred = bundle.predict_frame(test)
    assert result.test is not None
    np.testing.assert_allclose(pred.components, torch.sigmoid(torch.as_tensor(result.test.logits)).T.numpy(),
                               rtol=1e-5, atol=1e-7)
    # `ctr-ad predict` on the raw log scores the rows as the bundle does on the ingested ones.
    out = tmp_path / "preds.parquet"
    args = ["predict", "--bundle", str(result.run_dir), "--input", str(CRITEO_8K / "test.tsv"), "--source",
            "criteo", "--out", str(out)]
    assert cli_main(args) == 0, capsys.readouterr().err
    np.testing.assert_allclose(pl.read_parquet(out)["ctr"].to_numpy(), pred.ctr, rtol=1e-5, atol=1e-7)
    with pytest.raises(UserError, match=r"model.hash_buckets: unknown categorical field\(s\) \['C99'\]"):
        train(data_dir, small_config(model__hash_buckets="{C99: 8}"), tmp_path / "bad", log=False)


# ----------------------------------------------------------------------------------------- memory check
def test_memory_estimate_is_the_models_bytes_and_a_small_limit_is_refused(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(DEMO_CONFIG, ["model.hash_buckets=300", "train.embedding_optimizer=adam",
                                    "model.anchor=none", "train.weight_averaging_epochs=0"])
    cards, fields = [77, 821, 1007, 3], ["a", "b", "c", "d"]
    model = EnsembleCTR.from_config(cfg.model, cards, 13, fields=fields)
    estimate = estimate_memory(cfg, cards, fields, 13, sparse=False)
    assert estimate.parameters == 4 * sum(p.numel() for p in model.parameters())
    assert estimate.embedding_parameters == 4 * 4 * (77 + 302 + 302 + 3) * cfg.model.embedding_dim
    # The optimizer state after a step is what the estimate said (Adam: two moments per weight).
    (opt,) = build_optimizers(model, cfg, sparse=False)
    model(torch.zeros(8, 4, dtype=torch.long), torch.zeros(8, 13)).sum().backward()
    opt.step()
    moments = sum(v.numel() * 4 for s in opt.state.values() for v in s.values() if v.dim() > 0)
    assert estimate.optimizer_state == moments and estimate.gradients == estimate.parameters

    with pytest.raises(UserError) as refused:
        train(data_dir, small_config(train__memory_limit_gib=0.0001), tmp_path / "a", log=False)
    message = str(refused.value)
    assert "\n" not in message and "does not fit" in message and "0.0001 GiB available" in message
    assert "optimizer state" in message and "train.memory_limit_gib" in message
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    monkeypatch.setenv(LIMIT_ENV, "0.0001")
    with pytest.raises(UserError, match=LIMIT_ENV):
        train(data_dir, small_config(), tmp_path / "b", log=False)


# ----------------------------------------------------------------------------------------- shared tables
def test_share_embeddings_trains_one_table_and_its_bundle_serves(tmp_path: Path, data_dir: Path) -> None:
    cfg = small_config(model__components=3, model__share_embeddings="true", train__epochs=1)
    result = train(data_dir, cfg, tmp_path / "run", log=False)
    model = result.model
    assert model.embedding.weight.shape == (sum(model.cardinalities), 4)  # one table, not K
    own = estimate_memory(cfg, model.cardinalities, [f"f{i}" for i in range(model.n_fields)], 26, True)
    separate = small_config(model__components=3, train__epochs=1)
    plain = estimate_memory(separate, model.cardinalities, [f"f{i}" for i in range(model.n_fields)], 26, True)
    assert own.tables == 1 and plain.embedding_parameters == 3 * own.embedding_parameters
    bundle = bundle_mod.load(result.run_dir)
    assert bundle.metadata["share_embeddings"] is True
    pred = bundle.predict_frame(pl.read_parquet(data_dir / "test.parquet"))
    assert result.test is not None
    np.testing.assert_allclose(pred.components, torch.sigmoid(torch.as_tensor(result.test.logits)).T.numpy(),
                               rtol=1e-5, atol=1e-7)
    assert np.ptp(pred.components, axis=1).mean() > 1e-4  # the towers stay separate models
    assert result.test_metrics is not None and result.test_metrics["auc"] > 0.6


def test_component_parallelism_refuses_a_shared_table() -> None:
    from ctr_ad.config import Config

    shared = {"model": {"share_embeddings": True}}
    with pytest.raises(UserError, match="share_embeddings"):
        Config.from_dict({"train": {"parallelism": "component"}, **shared}, "cfg.yaml")
    assert Config.from_dict({"train": {"parallelism": "data"}, **shared}).model.share_embeddings
    per_component = {"best_step_selection": "per_component"}
    with pytest.raises(UserError, match="per_component"):
        Config.from_dict({"train": per_component, **shared}, "cfg.yaml")
    with pytest.raises(UserError, match="per_component"):
        Config.from_dict({"train": {**per_component, "parallelism": "component"}}, "cfg.yaml")
