"""A Criteo-like synthetic click log with a planted ground-truth click model.

Layout: Criteo TSV (label, I1..I13 integers, C1..C26 8-hex-digit categories, empty = missing).
- Integer features are heavy-tailed (log-normal counts), with Criteo-like missing rates; I2 has a
  few negatives (-1..-3) as in the real log.
- Categorical features are Zipf-distributed over cardinalities from 3 to 2 million values (profile
  ``default``), or over the per-field sizes published for Criteo 1TB, up to 40 million values
  (profile ``criteo1tb``; see :data:`CRITEO_1TB_CARDINALITIES`).
- Clicks follow a logistic ground truth: an intercept giving a base CTR near 25 %, smooth effects of
  three integer features, per-value effects of six categorical fields (rarer values included), one
  categorical cross (C1 x C9) and one integer x categorical interaction (I1 x C2).
Rows are generated in fixed blocks, each from its own ``SeedSequence([seed, block])``: memory is
constant for any row count and the output depends only on (seed, rows, profile).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from ctr_ad.schema import CRITEO_CATEGORICAL, CRITEO_DENSE

BLOCK_ROWS = 100_000

# Per categorical field: (cardinality, Zipf exponent, missing rate) — shaped after Criteo's.
CATEGORICAL_SPECS: tuple[tuple[int, float, float], ...] = (
    (1_400, 1.3, 0.0), (550, 1.2, 0.0), (2_000_000, 1.05, 0.03), (300_000, 1.1, 0.03),
    (300, 1.4, 0.0), (24, 1.5, 0.12), (12_000, 1.2, 0.0), (630, 1.3, 0.0), (3, 2.0, 0.0),
    (90_000, 1.1, 0.0), (5_700, 1.2, 0.0), (1_500_000, 1.05, 0.03), (3_200, 1.2, 0.0),
    (27, 1.5, 0.0), (14_000, 1.2, 0.0), (1_000_000, 1.05, 0.03), (10, 1.6, 0.0),
    (5_600, 1.2, 0.0), (2_200, 1.3, 0.44), (4, 1.8, 0.44), (1_200_000, 1.05, 0.03),
    (18, 1.5, 0.76), (15, 1.6, 0.0), (140_000, 1.1, 0.03), (100, 1.4, 0.44), (80_000, 1.1, 0.44),
)  # fmt: skip

# Criteo 1TB's categorical fields C1..C26: the embedding-table sizes TorchRec's DLRM example and the
# MLPerf DLRM-DCNv2 benchmark use for it, i.e. each field's number of distinct values in the 24 days,
# with the five largest fields reduced to 40 million by the standard preprocessing.
CRITEO_1TB_CARDINALITIES: tuple[int, ...] = (
    40_000_000, 39_060, 17_295, 7_424, 20_265, 3, 7_122, 1_543, 63, 40_000_000, 3_067_956, 405_282, 10,
    2_209, 11_938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000, 590_152, 12_973, 108, 36,
)  # fmt: skip


def _criteo_1tb_exponent(cardinality: int) -> float:
    # Flatter tails for larger fields (as in the default profile): with s near 1 a large field keeps
    # producing new values at almost every row, which is what makes counting its values expensive.
    if cardinality >= 1_000_000:
        return 1.05
    if cardinality >= 10_000:
        return 1.1
    if cardinality >= 1_000:
        return 1.2
    return 1.4


# The same missing rates as the default profile, field by field.
CRITEO_1TB_SPECS: tuple[tuple[int, float, float], ...] = tuple(
    (card, _criteo_1tb_exponent(card), miss)
    for card, (_, _, miss) in zip(CRITEO_1TB_CARDINALITIES, CATEGORICAL_SPECS, strict=True)
)
#: Cardinality profiles of ``ctr-ad synth --profile``: per categorical field (cardinality, Zipf exponent,
#: missing rate). The click model and the integer fields are the same in every profile.
PROFILES: dict[str, tuple[tuple[int, float, float], ...]] = {
    "default": CATEGORICAL_SPECS,
    "criteo1tb": CRITEO_1TB_SPECS,
}

# Per integer field: (log-normal mu, sigma, missing rate).
DENSE_SPECS: tuple[tuple[float, float, float], ...] = (
    (0.8, 1.2, 0.45), (2.0, 2.0, 0.0), (2.2, 1.5, 0.21), (1.6, 1.2, 0.22), (7.5, 2.5, 0.03),
    (3.5, 2.0, 0.22), (1.5, 1.5, 0.04), (2.5, 1.2, 0.0), (3.8, 1.5, 0.04), (0.4, 0.8, 0.45),
    (1.0, 1.1, 0.04), (0.3, 1.0, 0.76), (1.8, 1.3, 0.22),
)  # fmt: skip

INTERCEPT = -1.95  # tuned so the marginal CTR is close to 25 %
# (categorical field index, effect scale): fields whose values carry signal.
CATEGORY_EFFECTS = ((0, 0.6), (1, 0.5), (3, 0.4), (5, 0.5), (13, 0.6), (16, 0.4))
DENSE_EFFECTS = ((0, 0.35), (2, -0.25), (6, 0.3))
CROSS_SCALE = 0.7  # C1 x C9
INTERACTION_SCALE = 0.25  # I1 x C2


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hashed_normal(key: np.ndarray, salt: int) -> np.ndarray:
    """A fixed standard-normal value per integer key (Box-Muller on two hashed uniforms)."""
    with np.errstate(over="ignore"):
        h1 = _splitmix(key * np.uint64(2654435761) + np.uint64(salt * 7919 + 1))
        h2 = _splitmix(h1 ^ np.uint64(0xD6E8FEB86659FD93))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _zipf_ranks(rng: np.random.Generator, n: int, cardinality: int, s: float) -> np.ndarray:
    """Ranks 0..cardinality-1 from a bounded continuous power law (inverse CDF, vectorized)."""
    u = rng.random(n)
    top = (cardinality + 1.0) ** (1.0 - s)
    x = ((top - 1.0) * u + 1.0) ** (1.0 / (1.0 - s))
    return np.minimum(x.astype(np.int64) - 1, cardinality - 1)


def _hex_ids(field: int, ranks: np.ndarray) -> pl.Series:
    """8-hex-digit category ids like Criteo's hashed values; a fixed function of (field, rank)."""
    with np.errstate(over="ignore"):
        h = _splitmix(ranks.astype(np.uint64) + np.uint64(field) * np.uint64(0x100000001B3))
    raw = (h & np.uint64(0xFFFFFFFF)).astype(">u4").view("S4")
    return pl.Series(raw, dtype=pl.Binary).bin.encode("hex")


def profile_specs(profile: str) -> tuple[tuple[int, float, float], ...]:
    try:
        return PROFILES[profile]
    except KeyError:
        from ctr_ad.errors import UserError

        raise UserError(f"unknown synthetic profile {profile!r} (choose from {', '.join(PROFILES)})") from None


def generate_block(seed: int, block: int, rows: int, profile: str = "default") -> pl.DataFrame:
    """One block of synthetic rows as a frame in Criteo column order (nulls = missing)."""
    specs = profile_specs(profile)
    rng = np.random.default_rng(np.random.SeedSequence([seed, block]))
    logit = np.full(rows, INTERCEPT)
    dense: dict[str, np.ndarray] = {}
    dense_missing: dict[str, np.ndarray] = {}
    for j, (mu, sigma, miss) in enumerate(DENSE_SPECS):
        values = np.floor(np.exp(rng.normal(mu, sigma, rows))).astype(np.int64)
        if j == 1:  # I2: a few small negatives, as in Criteo
            values = np.where(rng.random(rows) < 0.05, -rng.integers(1, 4, rows), values)
        dense[CRITEO_DENSE[j]] = values
        dense_missing[CRITEO_DENSE[j]] = rng.random(rows) < miss
    z_dense = {j: (np.log1p(np.maximum(dense[CRITEO_DENSE[j]], 0)) - DENSE_SPECS[j][0]) / DENSE_SPECS[j][1]
               for j in range(len(DENSE_SPECS))}
    for j, w in DENSE_EFFECTS:
        logit += np.where(dense_missing[CRITEO_DENSE[j]], 0.0, w * np.tanh(z_dense[j]))

    ranks: dict[int, np.ndarray] = {}
    missing: dict[int, np.ndarray] = {}
    for i, (card, s, miss) in enumerate(specs):
        ranks[i] = _zipf_ranks(rng, rows, card, s)
        missing[i] = rng.random(rows) < miss
    for i, scale in CATEGORY_EFFECTS:
        effect = scale * _hashed_normal(ranks[i].astype(np.uint64), salt=i)
        logit += np.where(missing[i], 0.0, effect)
    cross_key = ranks[0].astype(np.uint64) * np.uint64(7) + ranks[8].astype(np.uint64)
    logit += CROSS_SCALE * _hashed_normal(cross_key, salt=101)
    c2_slope = _hashed_normal(ranks[1].astype(np.uint64), salt=202)
    logit += np.where(dense_missing["I1"], 0.0, INTERACTION_SCALE * c2_slope * z_dense[0])

    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    cols: dict[str, pl.Series] = {"label": pl.Series("label", label)}
    for name, values in dense.items():
        cols[name] = pl.Series(name, values).set(pl.Series(dense_missing[name]), None)
    for i, name in enumerate(CRITEO_CATEGORICAL):
        cols[name] = _hex_ids(i, ranks[i]).set(pl.Series(missing[i]), None).alias(name)
    return pl.DataFrame(cols)


def iter_blocks(rows: int, seed: int, profile: str = "default") -> Iterator[pl.DataFrame]:
    for block, start in enumerate(range(0, rows, BLOCK_ROWS)):
        yield generate_block(seed, block, min(BLOCK_ROWS, rows - start), profile)


def write_synthetic(out: Path, rows: int, seed: int, progress: bool = False, profile: str = "default") -> int:
    """Write ``rows`` synthetic rows as Criteo TSV (gzip if ``out`` ends in .gz), atomically."""
    profile_specs(profile)  # an unknown profile fails before a file is created
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    blocks = iter_blocks(rows, seed, profile)
    if progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, total=-(-rows // BLOCK_ROWS), unit="block", desc=f"synth {out.name}")
    written = 0
    with gzip.open(tmp, "wb", compresslevel=3) if out.suffix == ".gz" else open(tmp, "wb") as fh:
        for frame in blocks:
            buf = io.BytesIO()
            frame.write_csv(buf, separator="\t", include_header=False, null_value="", quote_style="never")
            fh.write(buf.getvalue())
            written += frame.height
    tmp.replace(out)
    return written
