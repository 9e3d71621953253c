"""The feature processor: fit on the training split, then turn raw rows into model inputs.

One definition serves ingest (large blocks), batch predict and the service (a few JSON records), so
what the model saw in training is what it sees in production.

Categorical fields: a vocabulary per field of the values seen at least ``min_count`` times in the
training split, ordered by count (descending) then by value, so it is identical on every run; a
per-field cap (``max_vocab``) keeps only the first N of that order. Index 0 = missing,
1 = out-of-vocabulary, 2.. = vocabulary entries. The counts behind it may spill to disk
(``ctr_ad.vocabulary``); the vocabulary does not depend on whether they did.

Dense fields, transform ``log1p`` (Criteo's counts): negatives are clipped to 0 (Criteo's I2 has -1,
-2 and -3, which carry no magnitude worth a separate scale) and ``log1p`` tames the heavy tail; the
result is then standardised with the training mean and standard deviation. Transform ``standard``
skips the log. A missing value becomes 0 (the training mean after standardising) and sets its own
indicator column ``<field>__missing``, so the model can tell "missing" from "average".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctr_ad import native
from ctr_ad.errors import UserError
from ctr_ad.schema import SourceSpec
from ctr_ad.vocabulary import CategoryCounter, resolve_max_vocab

__all__ = ["CategoryCounter", "DenseStats", "FeatureProcessor", "model_arrays"]

FORMAT_VERSION = 1
MISSING_INDEX = 0
OOV_INDEX = 1
RESERVED = 2
MISSING_SUFFIX = "__missing"
# Below this many rows a Python dict lookup beats building a polars hash table of the vocabulary.
SMALL_BATCH_ROWS = 4096
#: From this many values a vocabulary is binary-searched (sorted once) instead of hash-joined (hashed
#: again for every block): at 1M values the search is 3x faster, at 80k the join is 2x faster.
SEARCH_LOOKUP_FROM = 200_000


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


FitStatistics = tuple[dict[str, pl.DataFrame], dict[str, tuple[int, float, float]]]


class FeatureProcessor:
    """Fitted vocabularies and dense statistics, with a scikit-learn-like surface.

    * fitting: :meth:`unfitted` then :meth:`partial_fit` per block of training rows (ingest's counting
      pass; ``statistics=`` takes :meth:`fit_statistics` computed in a worker), or :meth:`fit` at once;
      the vocabularies and statistics are derived from the merged counts when next used;
    * :meth:`transform`: raw validated frame -> model-ready frame (what ingest writes);
    * :meth:`encode`: a frame (raw or model-ready) -> ``(cat int64 [N, F], dense float32 [N, D])``,
      the one frame -> arrays conversion used by training, batch predict and the service.
    """

    def __init__(
        self, source: str, label: str | None, categorical: list[str], dense: list[str], dense_transform: str,
        min_count: int, vocab: dict[str, list[str]] | None = None,
        dense_stats: dict[str, dict[str, float]] | None = None, schema: dict[str, Any] | None = None,
        max_vocab: int | dict[str, int] | None = None,
    ) -> None:
        self.source = source
        #: The declared schema of a ``table`` source (``TableSchema.document()``); None for built-ins.
        self.schema = schema
        self.label = label
        self.categorical = list(categorical)
        self.dense = list(dense)
        self.dense_transform = dense_transform
        self.min_count = min_count
        #: Per-field vocabulary caps (fields not named are uncapped).
        self.max_vocab = resolve_max_vocab(max_vocab, self.categorical)
        self._vocab = vocab if vocab is not None else {f: [] for f in self.categorical}
        self._dense_stats = dense_stats if dense_stats is not None else {}
        self._counter: CategoryCounter | None = None
        self._count_spill: tuple[Path, int] | None = None  # (directory, memory budget in bytes)
        self._stats: DenseStats | None = None
        self._stale = False
        self._lookup: dict[str, dict[str | None, int]] = {}
        self._lookup_moments: tuple[np.ndarray, np.ndarray] | None = None
        self._lookup_getters: list[Any] | None = None
        self._lookup_frames: dict[str, pl.DataFrame] = {}
        self._lookup_indexes: dict[str, native.StringIndex] = {}

    def __repr__(self) -> str:
        return f"FeatureProcessor(source={self.source!r}, categorical={len(self.categorical)}, dense={len(self.dense)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureProcessor) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    # ----------------------------------------------------------------------------- fitting
    @classmethod
    def unfitted(cls, source: str, spec: SourceSpec, dense: list[str], min_count: int,
                 max_vocab: int | dict[str, int] | None = None, count_spill_dir: Path | None = None,
                 count_memory_bytes: int | None = None) -> FeatureProcessor:
        """A processor for ``spec``'s fields, ready for :meth:`partial_fit`.

        ``count_spill_dir`` + ``count_memory_bytes``: the value counts spill to that directory past
        that many bytes (see ``ctr_ad.vocabulary``); the fitted result is the same either way.
        """
        schema = spec.table.document() if spec.table is not None else None
        fp = cls(source=source, label=spec.label, categorical=list(spec.categorical), dense=list(dense),
                 dense_transform=spec.dense_transform, min_count=min_count, schema=schema, max_vocab=max_vocab)
        if (count_spill_dir is None) != (count_memory_bytes is None):
            raise ValueError("count_spill_dir and count_memory_bytes go together")
        if count_spill_dir is not None and count_memory_bytes is not None:
            fp._count_spill = (Path(count_spill_dir), count_memory_bytes)
        return fp

    @staticmethod
    def fit_statistics(frame: pl.DataFrame, categorical: list[str], dense: list[str],
                       transform: str) -> FitStatistics:
        """What :meth:`partial_fit` needs from a block of training rows (small, cheap to pickle)."""
        return CategoryCounter.block_counts(frame, categorical), DenseStats(dense, transform).block_stats(frame)

    def partial_fit(self, frame: pl.DataFrame | None = None, *, statistics: FitStatistics | None = None
                    ) -> FeatureProcessor:
        """Add a block of training rows (or its :meth:`fit_statistics`) to the fit; returns self."""
        if (frame is None) == (statistics is None):
            raise TypeError("partial_fit takes a frame or statistics=, not both")
        if statistics is None:
            statistics = self.fit_statistics(frame, self.categorical, self.dense, self.dense_transform)
        if self._counter is None or self._stats is None:
            spill_dir, budget = self._count_spill or (None, None)
            self._counter = CategoryCounter(list(self.categorical), spill_dir, budget)
            self._stats = DenseStats(list(self.dense), self.dense_transform)
        counts, moments = statistics
        self._counter.add_counts(counts)
        self._stats.add_stats(moments)
        self._stale = True
        return self

    def fit(self, frame: pl.DataFrame) -> FeatureProcessor:
        """Fit on one frame of training rows (forgetting any earlier partial fit); returns self."""
        self._release_counts()
        return self.partial_fit(frame)

    def finish_fit(self) -> FeatureProcessor:
        """Derive the vocabularies and statistics now and free the counts behind them (their spill
        files included); a later :meth:`partial_fit` starts a new fit. Returns self."""
        self._refresh()
        self._release_counts()
        return self

    def _release_counts(self) -> None:
        if self._counter is not None:
            self._counter.close()
        self._counter = self._stats = None

    def _refresh(self) -> None:
        if self._stale and self._counter is not None and self._stats is not None:
            self._vocab = self._counter.vocabularies(self.min_count, self.max_vocab)
            self._dense_stats = self._stats.result()
            self._lookup.clear()
            self._lookup_moments = None
            self._lookup_getters = None
            self._lookup_frames.clear()
            self._lookup_indexes.clear()
            self._stale = False

    @property
    def vocab(self) -> dict[str, list[str]]:
        self._refresh()
        return self._vocab

    @property
    def dense_stats(self) -> dict[str, dict[str, float]]:
        self._refresh()
        return self._dense_stats

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
    def _table(self, f: str) -> dict[str | None, int]:
        self._refresh()
        table = self._lookup.get(f)
        if table is None:
            table = {v: i + RESERVED for i, v in enumerate(self.vocab[f])}
            table[""] = MISSING_INDEX  # an empty field is a missing value, as in the raw reader
            table[None] = MISSING_INDEX  # so is an absent one (None): one dict lookup for every value
            self._lookup[f] = table
        return table

    def _getters(self) -> list[Any]:
        """``dict.get`` of each categorical field's lookup table, in ``self.categorical`` order (cached)."""
        self._refresh()
        if self._lookup_getters is None:
            self._lookup_getters = [self._table(f).get for f in self.categorical]
        return self._lookup_getters

    def _dense_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the dense fields as arrays, in ``self.dense`` order (cached until refit)."""
        self._refresh()
        moments = self._lookup_moments
        if moments is None:
            stats = self.dense_stats
            moments = (np.array([stats[f]["mean"] for f in self.dense]),
                       np.array([stats[f]["std"] for f in self.dense]))
            self._lookup_moments = moments
        return moments

    def encode_columns(
        self, dense: Sequence[Sequence[float | None]] | np.ndarray, categorical: Sequence[Sequence[str | None]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The transform for a few rows given as columns (``self.dense`` then ``self.categorical``
        order, None = missing): ``(cat int64 [N, F], dense float32 [N, 2·D])`` in model order.
        ``dense`` may instead be a float64 array [N, D] with NaN for missing (the service's parser
        builds one to check integers; converting the lists twice cost more than the transform).

        Same formulas as the vectorized path of :meth:`transform` (tests check they agree on every
        real sample row); this one avoids building frames, which costs more than a model's forward
        pass for one request. The service and the small-batch path of ``transform`` use it.
        """
        if categorical:
            n = len(categorical[0])
        elif isinstance(dense, np.ndarray):
            n = dense.shape[0]
        else:
            n = len(dense[0]) if dense else 0
        getters = self._getters()
        if n < 8:
            # One comprehension: for a request of a few instances, a map() object per field costs
            # more than the lookups (1 instance: 16 µs against 44 µs on the benchmark machine).
            codes = [get(v, OOV_INDEX) for get, values in zip(getters, categorical, strict=True) for v in values]
        else:
            # map() over the bound dict methods runs the lookups in C.
            codes = []
            for get, values in zip(getters, categorical, strict=True):
                codes.extend(map(get, values, repeat(OOV_INDEX, n)))
        # One array conversion for all fields: per request the per-field numpy calls cost more than the lookups.
        cat = np.array(codes, dtype=np.int64).reshape(len(self.categorical), n).T
        n_dense = len(self.dense)
        out = np.zeros((n, 2 * n_dense), dtype=np.float32)
        if n_dense and n:
            # None -> NaN in float64; NaN marks "missing" through the transform.
            x = dense if isinstance(dense, np.ndarray) else np.array(dense, dtype=np.float64).reshape(n_dense, n).T
            is_missing = np.isnan(x)
            if self.dense_transform == "log1p":
                base = np.log1p(np.maximum(x, 0.0))
            elif self.dense_transform == "standard":
                base = x
            else:
                raise ValueError(f"unknown dense transform {self.dense_transform!r}")
            mean, std = self._dense_moments()
            z = (base - mean) / std
            z[is_missing] = 0.0
            out[:, :n_dense] = z
            out[:, n_dense:] = is_missing
        return cat, out

    def _code_frame(self, f: str) -> pl.DataFrame:
        """``(f, _code)``: each vocabulary value of ``f`` and its index; sorted by value when the
        vocabulary is large enough to be searched rather than joined (cached until refit)."""
        self._refresh()
        frame = self._lookup_frames.get(f)
        if frame is None:
            vocab = self.vocab[f]
            frame = pl.DataFrame({
                f: pl.Series(vocab, dtype=pl.Utf8),
                "_code": pl.int_range(RESERVED, len(vocab) + RESERVED, dtype=pl.Int32, eager=True),
            })
            if len(vocab) >= SEARCH_LOOKUP_FROM:
                frame = frame.sort(f)
            self._lookup_frames[f] = frame
        return frame

    def _codes(self, f: str, values: pl.Series) -> pl.Series:
        """Int32 indices of ``values`` (Utf8, null = missing) in the vocabulary of ``f``; values not
        in it are out-of-vocabulary. With the compiled kernels (:mod:`ctr_ad.native`), a probe of a
        hash table built once per vocabulary: a quarter of the CPU of the join below, which hashes
        the whole vocabulary again on every call."""
        if native.available():
            self._refresh()
            index = self._lookup_indexes.get(f)
            if index is None:
                index = native.StringIndex(self.vocab[f])
                self._lookup_indexes[f] = index
            return index.codes(values.alias(f), RESERVED, MISSING_INDEX, OOV_INDEX)
        return self._joined_codes(f, values)

    def _dictionary_codes(self, f: str, codes: np.ndarray, distinct: pl.Series) -> pl.Series:
        """:meth:`_codes` of a dictionary-encoded column: ``distinct[codes]`` (-1 = missing)."""
        looked_up = self._codes(f, distinct.cast(pl.Utf8)).to_numpy()
        index = np.append(looked_up, np.int32(MISSING_INDEX))  # code -1 picks the last: missing
        return pl.Series(f, index[codes], dtype=pl.Int32)

    def _joined_codes(self, f: str, values: pl.Series) -> pl.Series:
        """:meth:`_codes` without the compiled kernels.

        A left join of the one column against the vocabulary: a hash join, far cheaper than casting
        to an Enum of the vocabulary (which rebuilds its lookup on every call) or than joining the
        whole frame (which copies every column once per field); row order is the left's. A join
        hashes the whole vocabulary per block, so a vocabulary of millions is binary-searched in
        its sorted copy instead. Unmatched values are out-of-vocabulary; nulls are missing."""
        table = self._code_frame(f)
        if table.height >= SEARCH_LOOKUP_FROM:
            sorted_values = table.get_column(f)
            at = sorted_values.search_sorted(values).clip(0, table.height - 1)
            found = (sorted_values.gather(at) == values).fill_null(False)
            code = table.get_column("_code").gather(at).zip_with(found, pl.Series([None], dtype=pl.Int32))
        else:
            code = values.alias(f).to_frame().join(table, on=f, how="left", maintain_order="left").get_column("_code")
        return pl.select(
            pl.when(values.is_null()).then(pl.lit(MISSING_INDEX, dtype=pl.Int32))
            .otherwise(code.fill_null(OOV_INDEX))
            .alias(f)
        ).to_series()

    def transform(self, raw: pl.DataFrame,
                  encoded: Mapping[str, tuple[np.ndarray, pl.Series]] | None = None) -> pl.DataFrame:
        """Raw validated frame (see ``ctr_ad.ingest.reader``) -> model-ready columns.

        Output: ``label`` (Float32, when the input has one), one Int32 index column per categorical
        field, then Float32 dense columns and their ``__missing`` indicators. ``encoded`` gives
        categorical fields dictionary-encoded instead, as ``(codes, distinct values)`` (code -1 =
        missing; ingest's spills keep them so): each distinct value is looked up once.
        """
        if raw.height <= SMALL_BATCH_ROWS and not encoded:
            return self._transform_small(raw)
        encoded = encoded or {}
        cols: list[pl.Series] = []
        if "label" in raw.columns:
            cols.append(raw.get_column("label").cast(pl.Float32))
        for f in self.categorical:
            if f in encoded:
                cols.append(self._dictionary_codes(f, *encoded[f]))
                continue
            values = raw.get_column(f).cast(pl.Utf8) if f in raw.columns else pl.Series(f, [None] * raw.height, pl.Utf8)
            cols.append(self._codes(f, values))
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

    def _raw_columns(self, raw: pl.DataFrame) -> tuple[list, list]:
        """Dense columns as float64 arrays (NaN = missing) and categorical ones as lists (None =
        missing), in model order, for :meth:`encode_columns`."""
        n = raw.height
        nan = np.full(n, np.nan)
        dense = [raw.get_column(f).cast(pl.Float64).to_numpy() if f in raw.columns else nan for f in self.dense]
        cat = [raw.get_column(f).to_list() if f in raw.columns else [None] * n for f in self.categorical]
        return dense, cat

    def _transform_small(self, raw: pl.DataFrame) -> pl.DataFrame:
        n = raw.height
        cat, dense = self.encode_columns(*self._raw_columns(raw))
        cols: list[pl.Series] = []
        if "label" in raw.columns:
            cols.append(raw.get_column("label").cast(pl.Float32))
        cols += [pl.Series(f, cat[:, j], dtype=pl.Int32) for j, f in enumerate(self.categorical)]
        cols += [pl.Series(f, dense[:, j], dtype=pl.Float32) for j, f in enumerate(self.dense_columns)]
        return pl.DataFrame(cols, height=n)

    def is_model_ready(self, frame: pl.DataFrame) -> bool:
        """Whether ``frame`` holds model-ready columns (the output of :meth:`transform`)."""
        cols = set(frame.columns)
        if not all(c in cols for c in (*self.categorical_columns, *self.dense_columns)):
            return False
        return all(frame.schema[c].is_integer() for c in self.categorical_columns)

    def encode(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """A raw validated frame or a model-ready one -> ``(cat int64 [N, F], dense float32 [N, D])``,
        contiguous, in model order. Small raw batches go straight to arrays (no intermediate frame)."""
        if self.is_model_ready(frame):
            return model_arrays(frame, self.categorical_columns, self.dense_columns)
        if frame.height <= SMALL_BATCH_ROWS:
            cat, dense = self.encode_columns(*self._raw_columns(frame))
            return np.ascontiguousarray(cat), np.ascontiguousarray(dense)
        return model_arrays(self.transform(frame), self.categorical_columns, self.dense_columns)

    # ----------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        # A built-in source's file has no "schema" key, so its bytes (and fingerprints) are unchanged.
        declared = {"schema": self.schema} if self.schema is not None else {}
        return {
            **declared,
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "label": self.label,
            "categorical": self.categorical,
            "dense": self.dense,
            "dense_transform": self.dense_transform,
            "min_count": self.min_count,
            # Only when set: an uncapped features.json keeps the bytes (and dataset fingerprint) it had.
            **({"max_vocab": dict(self.max_vocab)} if self.max_vocab else {}),
            "reserved_indices": {"missing": MISSING_INDEX, "out_of_vocabulary": OOV_INDEX},
            "dense_stats": self.dense_stats,
            "vocab": self.vocab,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureProcessor:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"features: unsupported format_version {d.get('format_version')!r}")
        _check_dense_stats(list(d["dense"]), d["dense_stats"])
        return cls(
            source=d["source"], label=d["label"], categorical=list(d["categorical"]), dense=list(d["dense"]),
            dense_transform=d["dense_transform"], min_count=int(d["min_count"]),
            vocab={k: list(v) for k, v in d["vocab"].items()}, dense_stats=d["dense_stats"],
            schema=d.get("schema"),
            max_vocab=d.get("max_vocab"),
        )

    def dumps(self) -> str:
        """``json.dumps(self.to_dict(), indent=1, sort_keys=True, ensure_ascii=False)`` + newline, byte
        for byte, but fast: with an indent, json runs its pure-Python encoder, which took 0.4 s for
        the 530k values of a 2M-row Criteo sample while the ingest waited. The vocabularies (the last
        key in sorted order) are spliced in with the C string encoder instead."""
        d = self.to_dict()
        vocab = d.pop("vocab")
        head = json.dumps(d, indent=1, sort_keys=True, ensure_ascii=False)
        assert head.endswith("\n}") and all(k < "vocab" for k in d)  # "vocab" sorts last
        return f'{head[:-2]},\n "vocab": {_indented_vocab(vocab)}\n}}\n'

    def save(self, path: Path) -> None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(self.dumps(), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> FeatureProcessor:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
            raise UserError(f"{path}: not a valid features.json ({exc})") from None


def _indented_vocab(vocab: dict[str, list[str]]) -> str:
    """``vocab`` as ``json.dumps`` writes it with ``indent=1``, ``sort_keys`` and ``ensure_ascii=False``
    two levels deep (the value of a top-level key)."""
    if not vocab:
        return "{}"
    quote = json.encoder.encode_basestring  # the C encoder of one string, as json.dumps uses it
    fields = []
    for name in sorted(vocab):
        values = vocab[name]
        body = "[\n   " + ",\n   ".join(map(quote, values)) + "\n  ]" if values else "[]"
        fields.append(f"  {quote(name)}: {body}")
    return "{\n" + ",\n".join(fields) + "\n }"


def _check_dense_stats(dense: list[str], stats: dict[str, Any]) -> None:
    """Every dense field needs a finite mean and a finite, positive std (std = 0 would turn every
    value into NaN or inf)."""
    for f in dense:
        st = stats.get(f)
        if not isinstance(st, dict):
            raise ValueError(f"dense field {f!r} has no statistics")
        mean, std = st.get("mean"), st.get("std")
        if not isinstance(mean, int | float) or not math.isfinite(mean):
            raise ValueError(f"dense field {f!r}: mean {mean!r} is not a finite number")
        if not isinstance(std, int | float) or not math.isfinite(std) or std <= 0:
            raise ValueError(f"dense field {f!r}: std {std!r} is not a positive finite number")


def model_arrays(frame: pl.DataFrame, cat_cols: Sequence[str], dense_cols: Sequence[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready frame -> (categorical int64 [N, F], dense float32 [N, D]) contiguous arrays.

    The conversion behind :meth:`FeatureProcessor.encode` for model-ready frames; the training loaders
    (``ctr_ad.data``), which know the column names but hold no processor, call it directly.
    """
    n = frame.height
    cat = (frame.select(cat_cols).to_numpy().astype(np.int64, copy=False) if cat_cols
           else np.zeros((n, 0), dtype=np.int64))
    dense = (frame.select(dense_cols).to_numpy().astype(np.float32, copy=False) if dense_cols
             else np.zeros((n, 0), dtype=np.float32))
    return np.ascontiguousarray(cat), np.ascontiguousarray(dense)


def as_numpy(model_frame: pl.DataFrame, fp: FeatureProcessor) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready frame -> arrays (kept for callers of the old name; see :meth:`FeatureProcessor.encode`)."""
    return fp.encode(model_frame)
