"""The ensemble's forward pass in numpy, for the few rows of one service request.

PyTorch spends most of a one-instance forward in per-operator dispatch, not arithmetic: on the
2-core benchmark machine ``EnsembleCTR.forward`` takes ~0.6 ms for one row against ~0.15 ms for the
same ~15 operations in numpy. :class:`NumpyEnsemble` copies an evaluation-mode ``EnsembleCTR``'s
weights once and computes the same function (gather, the first layer split into its embedding and
dense parts, batched matmuls, ReLU or SmeLU, the linear anchor, the ensemble rule) in float32, so
predictions agree with the torch forward to float rounding (``tests/test_request_path.py``).

The service uses it for requests up to ``SMALL_BATCH_ROWS`` rows and PyTorch above that, where
torch's kernels are faster than numpy's. Training never uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from ctr_ad.features import RESERVED

if TYPE_CHECKING:
    from ctr_ad.model import EnsembleCTR

#: Largest batch scored by numpy; measured on 2 cores, torch is faster from a few hundred rows.
SMALL_BATCH_ROWS = 256


class NumpyEnsemble:
    """An ``EnsembleCTR``'s evaluation forward in numpy: logits, component probabilities, ensemble CTR."""

    def __init__(self, model: EnsembleCTR, prediction: Literal["mean_prob", "mean_logit"] = "mean_prob") -> None:
        def array(t: object) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().float().numpy())  # type: ignore[attr-defined]

        self.k = model.components
        self.n_fields = model.n_fields
        self.n_dense = model.n_dense
        self.dim = model.embedding_dim
        self.prediction = prediction
        self.activation = model.activation
        self.beta = np.float32(model.smelu_beta)
        self.table = array(model.embedding.weight)
        # Row of (component k, field f, vocabulary index i): k·rows_per_component + offset_f + i.
        self.offsets = (model.component_offsets.view(-1, 1, 1).cpu().numpy()
                        + model.field_offsets.cpu().numpy().reshape(1, 1, -1)).astype(np.int64)
        # Unsigned: one comparison of the indices viewed as uint64 also catches negative ones.
        self.cardinalities = np.asarray(model.cardinalities, dtype=np.uint64)
        self.hash_buckets = model.hash_buckets.cpu().numpy().astype(np.int64) if model.hashed else None
        weights = [array(w) for w in model.weights]
        split = self.n_fields * self.dim
        # x·W1 = emb·W1[:F·d] + dense·W1[F·d:]: no concatenation, no K-fold copy of the dense inputs.
        self.first_embedding = np.ascontiguousarray(weights[0][:, :split, :])
        self.first_dense = np.ascontiguousarray(weights[0][:, split:, :])
        self.weights = weights[1:]
        self.biases = [array(b) for b in model.biases]  # [K, 1, out]
        self.anchored = model.anchored
        if self.anchored:
            self.anchor_cat = array(model.anchor_cat)
            self.anchor_dense = array(model.anchor_dense)
            self.anchor_bias = np.float32(model.anchor_bias.item())
            self.vocab_offsets = model.vocab_offsets.cpu().numpy().astype(np.int64)

    def _rows(self, cat: np.ndarray) -> np.ndarray:
        if self.hash_buckets is None:
            return cat
        # The model's universal hash (ctr_ad.model.hashed_index), in int64 as there.
        from ctr_ad.model import HASH_INCREMENT, HASH_MULTIPLIER, HASH_PRIME

        h = ((cat % HASH_PRIME) * HASH_MULTIPLIER + HASH_INCREMENT) % HASH_PRIME
        rows = h % np.maximum(self.hash_buckets, 1) + RESERVED
        return np.where((self.hash_buckets > 0) & (cat >= RESERVED), rows, cat)

    def _act(self, x: np.ndarray) -> np.ndarray:
        if self.activation == "relu":
            return np.maximum(x, 0.0, out=x)
        beta = self.beta
        quad = np.square(x + beta) / (4.0 * beta)
        return np.where(x <= -beta, np.float32(0.0), np.where(x >= beta, x, quad)).astype(np.float32)

    def logits(self, cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Logits [K, B] (float32) for cat int [B, F] (vocabulary indices) and dense float [B, D]."""
        batch = cat.shape[0]
        # numpy would wrap a negative index; viewed as uint64 a negative one is huge, so out of range.
        if batch and np.greater_equal(np.asarray(cat, dtype=np.int64).view(np.uint64), self.cardinalities).any():
            raise ValueError("categorical index out of range for this bundle's vocabularies")
        idx = self._rows(cat)[None, :, :] + self.offsets  # [K, B, F]
        emb = self.table.take(idx.ravel(), axis=0).reshape(self.k, batch, self.n_fields * self.dim)
        dense32 = np.asarray(dense, dtype=np.float32)
        x = np.matmul(emb, self.first_embedding)
        if self.n_dense:
            x += np.matmul(dense32, self.first_dense)  # [B, D] @ [K, D, H] broadcasts to [K, B, H]
        x += self.biases[0]
        for w, b in zip(self.weights, self.biases[1:]):
            x = self._act(x)
            x = np.matmul(x, w)
            x += b
        z = x[:, :, 0]
        if self.anchored:
            anchor = self.anchor_cat.take(cat + self.vocab_offsets).sum(axis=-1, dtype=np.float32) + self.anchor_bias
            if self.n_dense:
                anchor = anchor + dense32 @ self.anchor_dense
            z = z + anchor
        return z

    def predict(self, cat: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ctr [B], component probabilities [B, K], their population std [B]), float64."""
        # Bare ufuncs rather than mean()/std()/errstate: for one row their Python wrappers cost more
        # than the arithmetic (the tail took 85 µs, now 35 µs on the 2-core benchmark machine).
        z = self.logits(cat, dense)
        probs = _sigmoid(z)  # float32, as torch.sigmoid
        mean_prob = np.add.reduce(probs, axis=0) / np.float32(self.k)
        mean_logit = self.prediction == "mean_logit"
        ctr = _sigmoid(np.add.reduce(z, axis=0) / np.float32(self.k)) if mean_logit else mean_prob
        spread = probs - mean_prob
        std = np.sqrt(np.add.reduce(spread * spread, axis=0) / np.float32(self.k))  # population std, as torch's
        return ctr.astype(np.float64), probs.T.astype(np.float64), std.astype(np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """float32 logistic; logits below -88 are clipped there (exp(88) is still finite in float32),
    which changes nothing after rounding: sigmoid(-88) is 6e-39, a float32 denormal."""
    e = np.exp(np.negative(np.maximum(z, np.float32(-88.0))))
    e += np.float32(1.0)
    return np.reciprocal(e, out=e)
