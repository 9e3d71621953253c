"""The service's request path outside HTTP: the fast decoder against the pydantic reference, and the
numpy forward of small batches against the model's torch forward."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from service_helpers import CRITEO_8K, instances, raw_rows

from ctr_ad.features import FeatureProcessor
from ctr_ad.model import EnsembleCTR, ensemble_probability
from ctr_ad.schema import CRITEO_CATEGORICAL, CRITEO_DENSE
from ctr_ad.small_batch import NumpyEnsemble
from service.encoding import ApiError, RequestParser


@pytest.fixture(scope="module")
def criteo_parser() -> tuple[RequestParser, list[dict[str, Any]]]:
    raw = pl.concat([raw_rows(CRITEO_8K / f"{s}.tsv") for s in ("train", "dev", "test")], how="diagonal_relaxed")
    fp = FeatureProcessor("criteo", "label", list(CRITEO_CATEGORICAL), list(CRITEO_DENSE), "log1p", 2).fit(raw)
    return RequestParser(fp, max_instances=10_000), instances(raw, fp.raw_fields)


def test_fast_decoder_equals_pydantic_on_every_real_row(criteo_parser: tuple[RequestParser, list[dict[str, Any]]]
                                                         ) -> None:
    parser, rows = criteo_parser
    body = json.dumps({"instances": rows}).encode()
    fast = parser.decode_fast(body)
    assert fast is not None and len(fast) == len(rows) > 7900
    assert fast == parser.decode_reference(body)
    # Value types too (== would let 3 == 3.0 and "3" != 3 slip): dense floats/None, categorical str/None.
    assert {type(v) for r in fast for v in r} <= {float, int, str, type(None)}
    assert all(isinstance(v, str) or v is None for r in fast for v in r[len(CRITEO_DENSE):])


@pytest.mark.parametrize("instance", [
    {},  # every field missing
    {"I1": None, "C1": None},
    {"C1": 12345},  # integer IDs are written in decimal
    {"C1": 9 ** 60, "C2": -7, "C3": "x"},  # beyond 64 bits
    {"I1": 0, "I2": 1e300, "I3": -5, "C26": ""},
])
def test_fast_decoder_equals_pydantic_on_edge_values(criteo_parser: tuple[RequestParser, list[dict[str, Any]]],
                                                     instance: dict[str, Any]) -> None:
    parser, _ = criteo_parser
    body = json.dumps({"instances": [instance, instance]}).encode()
    fast = parser.decode_fast(body)
    assert fast is not None
    assert fast == parser.decode_reference(body)
    assert [type(v) for v in fast[0]] == [type(v) for v in parser.decode_reference(body)[0]]


@pytest.mark.parametrize("body", [
    b'{"instances": [{"I1": true}]}', b'{"instances": [{"C1": false}]}', b'{"instances": [{"C1": 1.5}]}',
    b'{"instances": [{"I1": "3"}]}', b'{"instances": [{"I1": 1e400}]}', b'{"instances": [{"I1": NaN}]}',
    b'{"instances": [{"bogus": 1}]}', b'{"instances": []}', b'{"instances": [[1]]}', b'{"rows": []}',
    b'{"instances": [{}], "extra": 1}', b"[{}]", b'{"instances": [{"I1": 1}', b'{"instances": [{"I1": {"a": 1}}]}',
    json.dumps({"instances": [{}] * 10_001}).encode(),
])
def test_fast_decoder_leaves_every_invalid_body_to_pydantic(
        criteo_parser: tuple[RequestParser, list[dict[str, Any]]], body: bytes) -> None:
    parser, _ = criteo_parser
    assert parser.decode_fast(body) is None
    with pytest.raises(ApiError):
        parser.parse(body)


def test_parse_gives_columns_and_checks_integer_counts(criteo_parser: tuple[RequestParser, list[dict[str, Any]]]
                                                       ) -> None:
    parser, _ = criteo_parser
    batch = parser.parse(b'{"instances": [{"I1": 3, "C1": "a"}, {"C1": 7}]}')
    assert len(batch) == 2 and batch.column(0) == (3, None) and batch.column(13) == ("a", "7")
    with pytest.raises(ApiError) as err:
        parser.parse(b'{"instances": [{"I1": 3}, {"I5": 2.5}]}')
    assert err.value.status == 422 and err.value.errors[0]["path"] == "instances[1].I5"


# ------------------------------------------------------------------------------ numpy forward
MODELS = {
    "relu": {},
    "smelu": {"activation": "smelu", "smelu_beta": 0.5},
    "anchored": {"anchor": True},
    "hashed": {"hash_buckets": [5, None, 3]},
    "shared": {"share_embeddings": True},
    "single": {"components": 1},
}


@pytest.mark.parametrize("name", [*MODELS, "mean_logit"])
def test_numpy_forward_equals_torch(name: str) -> None:
    kwargs = {"components": 4, **MODELS.get(name, {})}
    model = EnsembleCTR([40, 9, 17], n_dense=2, embedding_dim=4, mlp=(8, 5), **kwargs).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking weights: embeddings, biases and the anchor away from 0
        model.embedding.weight.normal_(0.0, 1.0)
        for b in model.biases:
            b.normal_(0.0, 0.5)
        if model.anchored:
            model.set_anchor(torch.randn(66), torch.randn(2), 0.3)
    rng = np.random.default_rng(1)
    cat = np.stack([rng.integers(0, c, 64) for c in (40, 9, 17)], axis=1)
    dense = rng.normal(size=(64, 2)).astype(np.float32)
    mode = "mean_logit" if name == "mean_logit" else "mean_prob"
    ctr, comps, std = NumpyEnsemble(model, mode).predict(cat, dense)
    with torch.inference_mode():
        logits = model(torch.as_tensor(cat), torch.as_tensor(dense))
        want = ensemble_probability(logits, mode).numpy()
        probs = torch.sigmoid(logits).T.numpy()
    assert ctr.dtype == np.float64 and comps.shape == (64, kwargs["components"])
    np.testing.assert_allclose(ctr, want, rtol=0, atol=2e-7)
    np.testing.assert_allclose(comps, probs, rtol=0, atol=2e-7)
    np.testing.assert_allclose(std, probs.std(axis=1), rtol=0, atol=2e-7)
    assert np.ptp(ctr) > 0.01  # the rows differ: a constant output would pass the comparisons


def test_numpy_forward_refuses_indices_outside_the_vocabulary() -> None:
    model = EnsembleCTR([4, 3], n_dense=0, components=2, mlp=(4,)).eval()
    forward = NumpyEnsemble(model)
    dense = np.zeros((1, 0), dtype=np.float32)
    with pytest.raises(ValueError, match="out of range"):
        forward.predict(np.array([[4, 0]]), dense)
    with pytest.raises(ValueError, match="out of range"):
        forward.predict(np.array([[0, -1]]), dense)  # numpy would read row -1 silently
    assert forward.predict(np.array([[3, 2]]), dense)[0].shape == (1,)
