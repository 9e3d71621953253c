"""``EnsembleCTR``: K embedding+MLP components, vectorized over K.

Each component k has its own embedding per categorical field (dim d) and its own MLP that maps
[embeddings ‖ dense features] to one logit. Nothing loops over K in ``forward``:

* all K × F embedding tables live in **one** ``nn.Embedding`` of K · Σ_f rows_f rows; component k,
  field f, index i is row ``k · Σ_f rows_f + offset_f + i``, so one gather serves every component
  (and one sparse gradient, for SparseAdam / Adagrad);
* the MLP weights of layer l are one tensor [K, in, out]; a layer is one ``torch.baddbmm``.

Bounded tables (``model.hash_buckets``): a field with more vocabulary entries than N keeps its two
reserved rows (missing, out-of-vocabulary) and maps vocabulary index i ≥ 2 to row
2 + h(i) mod N, with h a fixed universal hash ((a·i + b) mod (2³¹ − 1)): integer arithmetic only, so
the rows are the same in every process, on every device, in training and serving. The inputs stay
vocabulary indices; hashing happens inside the model. With ``model.share_embeddings`` the K components
gather from one table (component offset 0) while their MLP towers stay separate.

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
from ctr_ad.features import RESERVED

# h(i) = ((i mod P) · A + B) mod P: (i mod P) · A < 2⁶², so int64 never overflows.
HASH_PRIME = 2_147_483_647  # 2³¹ − 1
HASH_MULTIPLIER = 1_103_515_245
HASH_INCREMENT = 12_345


def table_rows(cardinalities: Sequence[int], hash_buckets: Sequence[int | None] | None) -> list[int]:
    """Rows of each field's embedding table: its cardinality, or N + the reserved rows when hashed
    into N buckets bounds it (a field that already fits keeps one row per vocabulary entry)."""
    buckets = hash_buckets if hash_buckets is not None else [None] * len(cardinalities)
    return [c if n is None or c <= n + RESERVED else n + RESERVED for c, n in zip(cardinalities, buckets, strict=True)]


def hashed_index(index: Tensor, buckets: Tensor) -> Tensor:
    """Table rows of vocabulary indices ``index`` [..., F] for per-field bucket counts ``buckets`` [F]
    (0 = not hashed): reserved indices and unhashed fields pass through."""
    h = ((index % HASH_PRIME) * HASH_MULTIPLIER + HASH_INCREMENT) % HASH_PRIME
    rows = h % buckets.clamp(min=1) + RESERVED
    return torch.where((buckets > 0) & (index >= RESERVED), rows, index)


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
        hash_buckets: Sequence[int | None] | None = None,
        share_embeddings: bool = False,
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
        self.table_rows = table_rows(self.cardinalities, hash_buckets)
        self.rows_per_component = sum(self.table_rows)
        self.share_embeddings = bool(share_embeddings)
        self.tables = 1 if self.share_embeddings else self.components
        # The model's inputs stay vocabulary indices; a field is hashed only where that bounds its table.
        counts = [n if rows < card else 0
                  for n, rows, card in zip(hash_buckets or [None] * self.n_fields, self.table_rows,
                                           self.cardinalities, strict=True)]
        self.hashed = any(counts)

        # Derived from the cardinalities and the config, so not saved with the weights (persistent=False).
        self.register_buffer("field_offsets", _offsets(self.table_rows), persistent=False)
        self.register_buffer("vocab_offsets", _offsets(self.cardinalities), persistent=False)
        self.register_buffer("hash_buckets", torch.tensor(counts, dtype=torch.long), persistent=False)
        self.register_buffer(
            "component_offsets",
            (torch.arange(self.components, dtype=torch.long) * self.rows_per_component
             * (0 if self.share_embeddings else 1)).view(-1, 1, 1),
            persistent=False,
        )
        self.embedding = nn.Embedding(self.tables * max(self.rows_per_component, 1), self.embedding_dim, sparse=sparse)
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
            # One weight per vocabulary entry (the linear fit sees no hashing): 1 / (K·d) of unhashed tables.
            self.register_buffer("anchor_cat", torch.zeros(max(sum(self.cardinalities), 1)))
            self.register_buffer("anchor_dense", torch.zeros(self.n_dense))
            self.register_buffer("anchor_bias", torch.zeros(1))
        self.reset_parameters()

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        cardinalities: Sequence[int],
        n_dense: int,
        sparse: bool = False,
        fields: Sequence[str] | None = None,
    ) -> EnsembleCTR:
        """``fields`` (the categorical column names, model order) resolves a per-field ``hash_buckets``."""
        names = list(fields) if fields is not None else [f"field{i}" for i in range(len(cardinalities))]
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
            hash_buckets=cfg.hash_buckets_for(names),
            share_embeddings=cfg.share_embeddings,
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
        # take() gathers from the flat table without advanced indexing's set-up (a quarter less time).
        z = torch.take(self.anchor_cat, cat + self.vocab_offsets).sum(dim=-1) + self.anchor_bias
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
        rows = hashed_index(cat, self.hash_buckets) if self.hashed else cat
        idx = rows + self.field_offsets + self.component_offsets
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


def _offsets(sizes: Sequence[int]) -> Tensor:
    """Start of each block in a concatenation of blocks of ``sizes`` rows."""
    return torch.tensor([0, *itertools.accumulate(sizes)][: len(sizes)], dtype=torch.long)


def ensemble_probability(logits: Tensor, mode: Literal["mean_prob", "mean_logit"] = "mean_prob") -> Tensor:
    """Ensemble prediction [B] from logits [K, B]: mean of component probabilities, or σ(mean logit).

    The one rule for training, experiments, bundles and the service. float64 input stays float64
    (offline analysis); anything else is computed in float32.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    if mode == "mean_logit":
        return torch.sigmoid(z.mean(dim=0))
    return torch.sigmoid(z).mean(dim=0)
