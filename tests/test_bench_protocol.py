"""The training benchmark's protocol helpers: round-robin windows and the impossible-row guard."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from common import interleaved_windows, spread


def test_interleaved_windows_rotate_and_warm_up_first() -> None:
    calls: list[str] = []
    variants = {n: (lambda r, n=n: calls.append(f"{n}{r}") or float(r)) for n in "abc"}
    out = interleaved_windows(variants, lambda n: calls.append(f"w{n}"), rounds=3)
    assert calls == ["wa", "wb", "wc", "a0", "b0", "c0", "b1", "c1", "a1", "c2", "a2", "b2"]
    assert out == {"a": [0.0, 1.0, 2.0], "b": [0.0, 1.0, 2.0], "c": [0.0, 1.0, 2.0]}


def test_spread() -> None:
    assert spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}


def _s(median: float, lo: float | None = None, hi: float | None = None) -> dict[str, float]:
    return {"min": lo or median, "median": median, "max": hi or median, "n": 3}


def _row(k: int, batch: int, vec: float, loop: float, deepctr: float, pen: float | None) -> dict:
    return {"K": k, "batch": batch, "device": "cpu", "vectorized_ex_s": _s(vec), "loop_ex_s": _s(loop),
            "deepctr_ex_s": _s(deepctr), "vectorized_with_penalty_ex_s": _s(pen) if pen else None,
            "matmul_gflops": _s(100.0), "roofline_fraction": 0.3, "model_gflops": 30.0}


def test_old_committed_k8_b512_row_is_flagged_impossible() -> None:
    bench_train = pytest.importorskip("bench_train")
    # results/train.json before this benchmark was rewritten (batch 512 rows)
    rows = [_row(1, 512, 2196, 1520, 853, None), _row(4, 512, 1152, 441, 126, 877),
            _row(8, 512, 544, 140, 1022, 4378)]
    bench_train.plausibility(rows)
    assert rows[0]["trusted"] and rows[1]["trusted"]
    k8 = rows[2]
    assert not k8["trusted"]
    assert any("penalty variant" in m for m in k8["impossible"])
    assert any("deepctr faster at K=8" in m for m in k8["impossible"])


def test_noisy_row_is_not_trusted_but_not_impossible() -> None:
    bench_train = pytest.importorskip("bench_train")
    row = _row(4, 4096, 1000, 900, 300, 800)
    row["vectorized_ex_s"] = _s(1000, 500, 1100)
    bench_train.plausibility([row])
    assert row["impossible"] == [] and row["noisy"] and not row["trusted"]
