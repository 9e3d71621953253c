"""Scoring an ensemble on a split: component logits, the ensemble probability, logloss and AUC."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctr_ad import metrics as M
from ctr_ad.config import Config
from ctr_ad.data import TensorData, iter_eval_chunks
from ctr_ad.model import EnsembleCTR, ensemble_probability


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp`` is on; a no-op elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict_logits(
    model: EnsembleCTR, chunks: Iterator[TensorData], device: torch.device, amp: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [K, N] float32, labels [N]) over evaluation chunks, in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for chunk in chunks:
        with autocast(device, amp):
            z = model(chunk.cat.to(device), chunk.dense.to(device))
        logits.append(z.float().cpu())
        labels.append(chunk.label.cpu())
    model.train(was_training)
    if not logits:
        return np.zeros((model.components, 0), np.float32), np.zeros(0, np.float32)
    return torch.cat(logits, dim=1).numpy(), torch.cat(labels).numpy()


@dataclass
class Evaluation:
    """One split scored: component logits [K, N], labels [N] and the summary metrics."""

    logits: np.ndarray
    labels: np.ndarray
    logloss: float
    auc: float
    component_logloss_mean: float
    #: Each component's own logloss [K] (per-component best-step selection reads it).
    component_logloss: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {"logloss": self.logloss, "auc": self.auc}


def evaluate(
    model: EnsembleCTR, source: TensorData | Path, cat_cols: list[str], dense_cols: list[str], cfg: Config,
    device: torch.device,
) -> Evaluation:
    chunks = iter_eval_chunks(source, cat_cols, dense_cols, cfg.data.eval_batch_size)
    logits, labels = predict_logits(model, chunks, device, cfg.train.amp)
    return score_logits(logits, labels, cfg)


def score_logits(logits: np.ndarray, labels: np.ndarray, cfg: Config) -> Evaluation:
    """The metrics of component logits [K, N] against labels [N] (also for logits gathered from ranks)."""
    if labels.size == 0:
        return Evaluation(logits, labels, math.nan, math.nan, math.nan)
    z = torch.from_numpy(logits)
    probs = ensemble_probability(z, cfg.model.prediction).numpy()
    comp = [M.logloss(labels, torch.sigmoid(z[k]).numpy()) for k in range(z.shape[0])]
    return Evaluation(logits, labels, M.logloss(labels, probs), M.auc(labels, probs), float(np.mean(comp)), comp)
