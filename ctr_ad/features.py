"""The feature processor: fit on the training split, then turn raw rows into model inputs.

One definition serves ingest (large blocks), batch predict and the service (a few JSON records), so
what the model saw in training is what it sees in production.

Categorical fields: a vocabulary per field of the values seen at least ``min_count`` times in the
training split, ordered by count (descending) then by value, so it is identical on every run.
Index 0 = missing, 1 = out-of-vocabulary, 2.. = vocabulary entries.

Dense fields, transform ``log1p`` (Criteo's counts): negatives are clipped to 0 (Criteo's I2 has -1,
-2 and -3, which carry no magnitude worth a separate scale) and ``log1p`` tames the heavy tail; the
result is then standardised with the training mean and standard deviation. Transform ``standard``
skips the log. A missing value becomes 0 (the training mean after standardising) and sets its own
indicator column ``<field>__missing``, so the model can tell "missing" from "average".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctr_ad.schema import SourceSpec

FORMAT_VERSION = 1
MISSING_INDEX = 0
OOV_INDEX = 1
RESERVED = 2
MISSING_SUFFIX = "__missing"
# Below this many rows a Python dict lookup beats building a polars hash table of the vocabulary.
SMALL_BATCH_ROWS = 4096


class CategoryCounter:
    """Streaming value counts of the categorical fields (bounded by the number of distinct values)."""

    def __init__(self, fields: list[str]) -> None:
        self.fields = fields
        self._parts: dict[str, list[pl.DataFrame]] = {f: [] for f in fields}
        self._rows: dict[str, int] = dict.fromkeys(fields, 0)

    @staticmethod
    def block_counts(frame: pl.DataFrame, fields: list[str]) -> dict[str, pl.DataFrame]:
        return {
            f: frame.get_column(f).drop_nulls().value_counts(name="count").rename({f: "value"})
            for f in fields
        }

    def add_counts(self, counts: dict[str, pl.DataFrame]) -> None:
        for f, part in counts.items():
            self._parts[f].append(part.cast({"count": pl.Int64}))
            self._rows[f] += part.height
            if len(self._parts[f]) >= 4:
                self._parts[f] = [self._merged(f)]
                self._rows[f] = self._parts[f][0].height

    def add(self, frame: pl.DataFrame) -> None:
        self.add_counts(self.block_counts(frame, self.fields))

    def _merged(self, f: str) -> pl.DataFrame:
        parts = self._parts[f]
        if not parts:
            return pl.DataFrame(schema={"value": pl.Utf8, "count": pl.Int64})
        return pl.concat(parts).group_by("value").agg(pl.col("count").sum())

    def vocab(self, f: str, min_count: int) -> list[str]:
        counts = self._merged(f).filter(pl.col("count") >= min_count)
        return counts.sort(["count", "value"], descending=[True, False]).get_column("value").to_list()


class DenseStats:
    """Streaming mean and standard deviation of the transformed dense values (missing excluded)."""

    def __init__(self, fields: list[str], transform: str) -> None:
        self.fields = fields
        self.transform = transform
        self.n = dict.fromkeys(fields, 0)
        self.s = dict.fromkeys(fields, 0.0)
        self.ss = dict.fromkeys(fields, 0.0)

    def block_stats(self, frame: pl.DataFrame) -> dict[str, tuple[int, float, float]]:
        if not self.fields:
            return {}
        # Transform each column once, then aggregate (not once per aggregate).
        values = frame.select(_dense_base(pl.col(f), self.transform).alias(f) for f in self.fields)
        exprs = []
        for f in self.fields:
            v = pl.col(f)
            exprs += [v.count().alias(f"{f}:n"), v.sum().alias(f"{f}:s"), (v * v).sum().alias(f"{f}:ss")]
        row = values.select(exprs).row(0, named=True)
        return {f: (int(row[f"{f}:n"]), float(row[f"{f}:s"] or 0.0), float(row[f"{f}:ss"] or 0.0))
                for f in self.fields}

    def add_stats(self, stats: dict[str, tuple[int, float, float]]) -> None:
        for f, (n, s, ss) in stats.items():
            self.n[f] += n
            self.s[f] += s
            self.ss[f] += ss

    def result(self) -> dict[str, dict[str, float]]:
        out = {}
        for f in self.fields:
            n = self.n[f]
            mean = self.s[f] / n if n else 0.0
            var = max(self.ss[f] / n - mean * mean, 0.0) if n else 0.0
            std = math.sqrt(var)
            out[f] = {"mean": mean, "std": std if std > 1e-12 else 1.0, "count": n}
        return out


def _dense_base(expr: pl.Expr, transform: str) -> pl.Expr:
    if transform == "log1p":
        return expr.clip(lower_bound=0.0).log1p()
    if transform == "standard":
        return expr
    raise ValueError(f"unknown dense transform {transform!r}")


@dataclass
class FeatureProcessor:
    """Fitted vocabularies and dense statistics; ``transform`` makes model-ready columns."""

    source: str
    label: str | None
    categorical: list[str]
    dense: list[str]
    dense_transform: str
    min_count: int
    vocab: dict[str, list[str]]
    dense_stats: dict[str, dict[str, float]]
    _lookup: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)
    _lookup_enums: dict[str, pl.Enum] = field(default_factory=dict, repr=False, compare=False)

    # ----------------------------------------------------------------------------- fitting
    @classmethod
    def fit_from(
        cls, source: str, spec: SourceSpec, dense: list[str], counter: CategoryCounter,
        stats: DenseStats, min_count: int,
    ) -> FeatureProcessor:
        return cls(
            source=source,
            label=spec.label,
            categorical=list(spec.categorical),
            dense=list(dense),
            dense_transform=spec.dense_transform,
            min_count=min_count,
            vocab={f: counter.vocab(f, min_count) for f in spec.categorical},
            dense_stats=stats.result(),
        )

    # ----------------------------------------------------------------------------- schema
    @property
    def categorical_columns(self) -> list[str]:
        return list(self.categorical)

    @property
    def cardinalities(self) -> list[int]:
        return [len(self.vocab[f]) + RESERVED for f in self.categorical]

    @property
    def dense_columns(self) -> list[str]:
        return [*self.dense, *(f + MISSING_SUFFIX for f in self.dense)]

    @property
    def raw_fields(self) -> list[str]:
        """Raw field names a record may carry (the service validates requests against these)."""
        return [*self.dense, *self.categorical]

    # ----------------------------------------------------------------------------- transform
    def _table(self, f: str) -> dict[str, int]:
        table = self._lookup.get(f)
        if table is None:
            table = {v: i + RESERVED for i, v in enumerate(self.vocab[f])}
            table[""] = MISSING_INDEX  # an empty field is a missing value, as in the raw reader
            self._lookup[f] = table
        return table

    def encode_columns(
        self, dense: Sequence[Sequence[float | None]], categorical: Sequence[Sequence[str | None]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The transform for a few rows given as columns (``self.dense`` then ``self.categorical``
        order, None = missing): ``(cat int64 [N, F], dense float32 [N, 2·D])`` in model order.

        Same formulas as the vectorized path of :meth:`transform` (tests check they agree on every
        real sample row); this one avoids building frames, which costs more than a model's forward
        pass for one request. The service and the small-batch path of ``transform`` use it.
        """
        n = len(categorical[0]) if categorical else (len(dense[0]) if dense else 0)
        cat = np.empty((n, len(self.categorical)), dtype=np.int64)
        for j, f in enumerate(self.categorical):
            get = self._table(f).get
            cat[:, j] = [MISSING_INDEX if v is None else get(v, OOV_INDEX) for v in categorical[j]]
        n_dense = len(self.dense)
        out = np.zeros((n, 2 * n_dense), dtype=np.float32)
        if n_dense and n:
            # None -> NaN in float64; NaN marks "missing" through the transform.
            x = np.array(dense, dtype=np.float64).reshape(n_dense, n).T
            is_missing = np.isnan(x)
            if self.dense_transform == "log1p":
                base = np.log1p(np.maximum(x, 0.0))
            elif self.dense_transform == "standard":
                base = x
            else:
                raise ValueError(f"unknown dense transform {self.dense_transform!r}")
            mean = np.array([self.dense_stats[f]["mean"] for f in self.dense])
            std = np.array([self.dense_stats[f]["std"] for f in self.dense])
            z = (base - mean) / std
            z[is_missing] = 0.0
            out[:, :n_dense] = z
            out[:, n_dense:] = is_missing
        return cat, out

    def _index_large(self, f: str, values: pl.Series) -> pl.Series:
        # An Enum over the vocabulary maps a value to its position in one vectorized cast; values
        # outside it become null (out-of-vocabulary), nulls stay null (missing).
        enum = self._lookup_enums.get(f)
        if enum is None:
            enum = pl.Enum(self.vocab[f])
            self._lookup_enums[f] = enum
        codes = values.cast(pl.Utf8).cast(enum, strict=False).to_physical().cast(pl.Int32)
        return pl.select(
            pl.when(values.is_null()).then(pl.lit(MISSING_INDEX, dtype=pl.Int32))
            .when(codes.is_null()).then(pl.lit(OOV_INDEX, dtype=pl.Int32))
            .otherwise(codes + RESERVED)
            .alias(f)
        ).to_series()

    def transform(self, raw: pl.DataFrame) -> pl.DataFrame:
        """Raw validated frame (see ``ctr_ad.ingest.reader``) -> model-ready columns.

        Output: ``label`` (Float32, when the input has one), one Int32 index column per categorical
        field, then Float32 dense columns and their ``__missing`` indicators.
        """
        if raw.height <= SMALL_BATCH_ROWS:
            return self._transform_small(raw)
        cols: list[pl.Series] = []
        if "label" in raw.columns:
            cols.append(raw.get_column("label").cast(pl.Float32))
        for f in self.categorical:
            values = raw.get_column(f) if f in raw.columns else pl.Series(f, [None] * raw.height, pl.Utf8)
            cols.append(self._index_large(f, values))
        out = pl.DataFrame(cols) if cols else pl.DataFrame()
        dense_exprs: list[pl.Expr] = []
        missing_exprs: list[pl.Expr] = []
        for f in self.dense:
            st = self.dense_stats[f]
            col = pl.col(f).cast(pl.Float64) if f in raw.columns else pl.lit(None, dtype=pl.Float64)
            z = (_dense_base(col, self.dense_transform) - st["mean"]) / st["std"]
            dense_exprs.append(z.fill_null(0.0).cast(pl.Float32).alias(f))
            missing_exprs.append(col.is_null().cast(pl.Float32).alias(f + MISSING_SUFFIX))
        if dense_exprs:
            dense = raw.select(dense_exprs + missing_exprs) if raw.width else pl.DataFrame()
            out = pl.concat([out, dense], how="horizontal") if out.width else dense
        return out

    def _transform_small(self, raw: pl.DataFrame) -> pl.DataFrame:
        n = raw.height

        def column(f: str) -> list:
            return raw.get_column(f).to_list() if f in raw.columns else [None] * n

        cat, dense = self.encode_columns([column(f) for f in self.dense], [column(f) for f in self.categorical])
        cols: list[pl.Series] = []
        if "label" in raw.columns:
            cols.append(raw.get_column("label").cast(pl.Float32))
        cols += [pl.Series(f, cat[:, j], dtype=pl.Int32) for j, f in enumerate(self.categorical)]
        cols += [pl.Series(f, dense[:, j], dtype=pl.Float32) for j, f in enumerate(self.dense_columns)]
        return pl.DataFrame(cols, height=n)

    # ----------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "label": self.label,
            "categorical": self.categorical,
            "dense": self.dense,
            "dense_transform": self.dense_transform,
            "min_count": self.min_count,
            "reserved_indices": {"missing": MISSING_INDEX, "out_of_vocabulary": OOV_INDEX},
            "dense_stats": self.dense_stats,
            "vocab": self.vocab,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureProcessor:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"features: unsupported format_version {d.get('format_version')!r}")
        return cls(
            source=d["source"], label=d["label"], categorical=list(d["categorical"]), dense=list(d["dense"]),
            dense_transform=d["dense_transform"], min_count=int(d["min_count"]),
            vocab={k: list(v) for k, v in d["vocab"].items()}, dense_stats=d["dense_stats"],
        )

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    def save(self, path: Path) -> None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(self.dumps(), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> FeatureProcessor:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            from ctr_ad.errors import UserError

            raise UserError(f"{path}: not a valid features.json ({exc})") from None


def as_numpy(model_frame: pl.DataFrame, fp: FeatureProcessor) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready frame -> (categorical int64 [N, F], dense float32 [N, D]) contiguous arrays."""
    cat = model_frame.select(fp.categorical_columns).to_numpy().astype(np.int64, copy=False)
    dense_cols = fp.dense_columns
    if dense_cols:
        dense = model_frame.select(dense_cols).to_numpy().astype(np.float32, copy=False)
    else:
        dense = np.zeros((model_frame.height, 0), dtype=np.float32)
    return np.ascontiguousarray(cat), np.ascontiguousarray(dense)
