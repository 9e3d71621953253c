"""Your own CTR model, our reproducibility recipe: a DCN-style cross network as a K = 4 ensemble.

Run from the repository root (about 15 s on two cores)::

    python examples/own_model.py

It ingests the real Criteo 8k sample of data/ into a temporary directory, then trains two models
twice each, with different seeds (weights and data order), and prints how much their test
predictions differ between the two trainings (PD, ``ctr_ad.prediction_difference``):

* a single cross network (K = 1), trained the plain way;
* the same network wrapped into ``ctr_ad.Ensemble`` (K = 4, vectorized with torch.func), on top of
  a frozen ``ctr_ad.LinearAnchor``, evaluated with ``ctr_ad.WeightAverager``'s averaged weights.

The model below is ordinary PyTorch: nothing in it knows about ctr-ad. Only the training loop uses
the recipe's pieces.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ctr_ad
from ctr_ad.data import load_split
from ctr_ad.features import FeatureProcessor
from ctr_ad.ingest.run import run_ingest

CRITEO_8K = Path(__file__).resolve().parents[1] / "data" / "criteo-kaggle-8k"


class CrossNetwork(nn.Module):
    """DCN (Wang et al. 2017) in a few lines: x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l beside a small MLP."""

    def __init__(self, cardinalities: list[int], n_dense: int, dim: int = 8, cross_layers: int = 2,
                 hidden: int = 32) -> None:
        super().__init__()
        offsets = torch.tensor([0, *cardinalities[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.embedding = nn.Embedding(sum(cardinalities), dim)
        nn.init.normal_(self.embedding.weight, std=0.01)
        width = len(cardinalities) * dim + n_dense
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(cross_layers))
        self.deep = nn.Sequential(nn.Linear(width, hidden), nn.ReLU())
        self.head = nn.Linear(width + hidden, 1)

    def forward(self, cat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([self.embedding(cat + self.offsets).flatten(1), dense], dim=1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.head(torch.cat([x, self.deep(x0)], dim=1)).squeeze(-1)


def train_once(data: dict, features: FeatureProcessor, *, components: int, seed: int,
               anchor: ctr_ad.LinearAnchor | None, average: bool, epochs: int, batch: int) -> torch.Tensor:
    """Train one model and return its test probabilities (the ensemble rule over the K components)."""
    train, test = data["train"], data["test"]
    model = ctr_ad.Ensemble(lambda: CrossNetwork(features.cardinalities, len(features.dense_columns)),
                            components, seed=seed, anchor=anchor)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps_per_epoch = -(-len(train) // batch)
    averager = ctr_ad.WeightAverager(model, horizon_epochs=1.0, steps_per_epoch=steps_per_epoch) if average else None
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(train), generator=order).split(batch):
            logits = model(train.cat[rows], train.dense[rows])  # [K, B]
            loss = ctr_ad.ensemble_loss(logits, train.label[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if averager is not None:
                averager.update()
    model.eval()
    with torch.no_grad(), (averager.swapped_in() if averager is not None else contextlib.nullcontext()):
        return ctr_ad.ensemble_probability(model(test.cat, test.dense))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small batches: one thread is fastest and leaves the other cores alone
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "criteo8k"
        run_ingest([CRITEO_8K / "train.tsv", CRITEO_8K / "dev.tsv", CRITEO_8K / "test.tsv"], "criteo", out,
                   split="files", quiet=True)
        features = FeatureProcessor.load(out / "features.json")
        cols = (features.categorical_columns, features.dense_columns)
        data = {name: load_split(out / f"{name}.parquet", *cols) for name in ("train", "test")}
    train, test = data["train"], data["test"]
    # The anchor is convex and fitted to convergence: both trainings get the same one. C = 0.03 is what
    # the validation search (pass valid=(cat, dense, label) and C=None) picks on this sample.
    anchor = ctr_ad.LinearAnchor.fit(train.cat, train.dense, train.label, features.cardinalities, C=0.03)
    rows = []
    for name, components, use_anchor, average in (("single cross network, plain", 1, False, False),
                                                  ("K=4 ensemble + anchor + averaging", 4, True, True)):
        runs = [train_once(data, features, components=components, seed=seed, anchor=anchor if use_anchor else None,
                           average=average, epochs=args.epochs, batch=args.batch) for seed in (1, 2)]
        acc = ctr_ad.accuracy_metrics(test.label, runs[0])
        pd_rel = ctr_ad.prediction_difference(runs[0], runs[1])
        rows.append((name, pd_rel, acc["logloss"], acc["auc"]))
    print(f"{'model':<36} {'PD (pd_rel)':>11} {'logloss':>8} {'AUC':>7}")
    for name, pd_rel, logloss, auc in rows:
        print(f"{name:<36} {pd_rel:>11.4f} {logloss:>8.4f} {auc:>7.4f}")
    print(f"PD ratio ensemble/single: {rows[1][1] / rows[0][1]:.3f} "
          f"({len(test)} test rows, {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
