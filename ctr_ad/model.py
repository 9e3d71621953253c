"""``EnsembleCTR``: K embedding+MLP components, vectorized over K.

Each component k has its own embedding per categorical field (dim d) and its own MLP that maps
[embeddings ‖ dense features] to one logit. Nothing loops over K in ``forward``:

* all K × F embedding tables live in **one** ``nn.Embedding`` of K · Σ_f rows_f rows; component k,
  field f, index i is row ``k · Σ_f rows_f + offset_f + i``, so one gather serves every component
  (and one sparse gradient, for SparseAdam / Adagrad);
* the MLP weights of layer l are one tensor [K, in, out]; a layer is one ``torch.baddbmm``.

``forward(cat, dense)`` takes the rows every component sees (cat [B, F], dense [B, D]) or, for
per-component data orders, one batch per component (cat [K, B, F], dense [K, B, D]) and returns the
logits [K, B]. K = 1 is the single model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ctr_ad.config import ModelConfig


def smelu(x: Tensor, beta: float) -> Tensor:
    """Smooth ReLU: 0 for x ≤ −β, (x + β)² / (4β) for |x| ≤ β, x for x ≥ β (continuous gradient)."""
    quad = (x + beta).square() / (4.0 * beta)
    return torch.where(x <= -beta, torch.zeros_like(x), torch.where(x >= beta, x, quad))


class EnsembleCTR(nn.Module):
    """K independent embedding+MLP CTR models evaluated as one batched computation."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        n_dense: int,
        components: int = 1,
        embedding_dim: int = 8,
        mlp: Sequence[int] = (64, 32),
        dropout: float = 0.0,
        activation: Literal["relu", "smelu"] = "relu",
        smelu_beta: float = 1.0,
        sparse: bool = False,
        anchor: bool = False,
    ) -> None:
        super().__init__()
        if components < 1:
            raise ValueError("components must be >= 1")
        if any(c < 1 for c in cardinalities):
            raise ValueError("every cardinality must be >= 1")
        self.cardinalities = [int(c) for c in cardinalities]
        self.n_fields = len(self.cardinalities)
        self.n_dense = int(n_dense)
        self.components = int(components)
        self.embedding_dim = int(embedding_dim)
        self.activation = activation
        self.smelu_beta = float(smelu_beta)
        self.rows_per_component = sum(self.cardinalities)

        offsets = [0]
        for c in self.cardinalities[:-1]:
            offsets.append(offsets[-1] + c)
        # Derived from the cardinalities, so not saved with the weights (persistent=False).
        self.register_buffer("field_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer(
            "component_offsets",
            (torch.arange(self.components, dtype=torch.long) * self.rows_per_component).view(-1, 1, 1),
            persistent=False,
        )
        self.embedding = nn.Embedding(
            self.components * max(self.rows_per_component, 1), self.embedding_dim, sparse=sparse
        )
        widths = [self.n_fields * self.embedding_dim + self.n_dense, *mlp, 1]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(self.components, w_in, w_out)) for w_in, w_out in itertools.pairwise(widths)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(self.components, 1, w_out)) for w_out in widths[1:])
        self.dropout = nn.Dropout(dropout)
        self.anchored = bool(anchor)
        if self.anchored:
            # A frozen linear model shared by every component: z_k = z_anchor + h_k. Buffers, so the
            # optimizers never see them, but saved with the weights (bundles, checkpoints).
            self.register_buffer("anchor_cat", torch.zeros(max(self.rows_per_component, 1)))
            self.register_buffer("anchor_dense", torch.zeros(self.n_dense))
            self.register_buffer("anchor_bias", torch.zeros(1))
        self.reset_parameters()

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, cardinalities: Sequence[int], n_dense: int, sparse: bool = False
    ) -> EnsembleCTR:
        return cls(
            cardinalities,
            n_dense,
            components=cfg.components,
            embedding_dim=cfg.embedding_dim,
            mlp=cfg.mlp,
            dropout=cfg.dropout,
            activation=cfg.activation,
            smelu_beta=cfg.smelu_beta,
            sparse=sparse,
            anchor=cfg.anchor != "none",
        )

    @torch.no_grad()
    def set_anchor(self, cat_weight: Tensor, dense_weight: Tensor, bias: float) -> None:
        """Install a fitted linear model (weights per global categorical row and per dense feature)."""
        if not self.anchored:
            raise ValueError("this model was built without an anchor")
        self.anchor_cat.copy_(torch.as_tensor(cat_weight, dtype=torch.float32))
        self.anchor_dense.copy_(torch.as_tensor(dense_weight, dtype=torch.float32))
        self.anchor_bias.fill_(float(bias))

    def anchor_logit(self, cat: Tensor, dense: Tensor) -> Tensor:
        """z_anchor [B] or [K, B] for cat [B, F] | [K, B, F] and dense [B, D] | [K, B, D]."""
        z = self.anchor_cat[cat + self.field_offsets].sum(dim=-1) + self.anchor_bias
        if self.n_dense:
            z = z + dense.to(self.anchor_dense.dtype) @ self.anchor_dense
        return z

    #: state_dict entries every component shares (the frozen anchor); all others are stacked per component.
    SHARED_STATE = frozenset({"anchor_cat", "anchor_dense", "anchor_bias"})

    def component_part(self, name: str, tensor: Tensor, k: int) -> Tensor | None:
        """Component ``k``'s part (a view) of ``tensor``, this model's state_dict entry ``name``, or None
        for an entry all components share. Per-component best-step selection copies these parts."""
        if name in self.SHARED_STATE:
            return None
        if name == "embedding.weight":
            rows = tensor.shape[0] // self.components
            return tensor[k * rows : (k + 1) * rows]
        if name.startswith(("weights.", "biases.")):
            return tensor[k]
        raise ValueError(f"no per-component layout is known for the state entry {name!r}")

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The optimizer groups: ``dense`` (MLP weights and biases) and ``embedding`` (the one table,
        whose gradient is sparse when the model was built with ``sparse=True``)."""
        return {"dense": [*self.weights, *self.biases], "embedding": [self.embedding.weight]}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise from ``generator``: components are drawn one after another, so they differ.

        Embeddings ~ N(0, 0.01²); MLP weights ~ U(±1/sqrt(fan_in)) (the nn.Linear default); biases 0.
        """
        self.embedding.weight.normal_(0.0, 0.01, generator=generator)
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            w.uniform_(-bound, bound, generator=generator)
            b.zero_()

    def _act(self, x: Tensor) -> Tensor:
        if self.activation == "relu":
            return torch.relu(x)
        return smelu(x, self.smelu_beta)

    def forward(
        self, cat: Tensor, dense: Tensor, embedding_l2: bool = False, dropout: bool = True
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits [K, B] from cat [B, F] | [K, B, F] (int64) and dense [B, D] | [K, B, D] (float).

        ``dropout=False`` runs a training-mode forward without dropout (the penalty's pass: a penalty
        on dropout-perturbed outputs would reward sensitivity to dropout noise, not diversity).

        With ``embedding_l2`` also returns Σ_k mean_b ‖e_kb‖², the squared norm of the embeddings the
        batch gathered: an L2 penalty on the rows in use that, unlike weight decay, keeps the
        embedding gradient sparse (rare ids, seen in few batches, are regularised only when used).
        """
        k = self.components
        # Broadcasting the offsets turns [B, F] into [K, B, F]: one gather for every component.
        idx = cat + self.field_offsets + self.component_offsets
        batch = idx.shape[1]
        emb = self.embedding(idx).reshape(k, batch, self.n_fields * self.embedding_dim)
        if dense.dim() == 2:
            dense = dense.unsqueeze(0).expand(k, -1, -1)
        x = torch.cat([emb, dense.to(emb.dtype)], dim=-1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = self._act(x)
                x = self.dropout(x) if dropout else x
        logits = x.squeeze(-1)
        if self.anchored:
            logits = logits + self.anchor_logit(cat, dense).to(logits.dtype)
        if embedding_l2:
            return logits, emb.float().square().sum() / batch
        return logits


def ensemble_probability(logits: Tensor, mode: Literal["mean_prob", "mean_logit"] = "mean_prob") -> Tensor:
    """Ensemble prediction [B] from logits [K, B]: mean of component probabilities, or σ(mean logit).

    The one rule for training, experiments, bundles and the service. float64 input stays float64
    (offline analysis); anything else is computed in float32.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    if mode == "mean_logit":
        return torch.sigmoid(z.mean(dim=0))
    return torch.sigmoid(z).mean(dim=0)
